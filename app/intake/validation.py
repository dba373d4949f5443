"""Apply the catalog's rules to an intake form and produce one normalized EditRequest.

Every rejection names the field (`image[1]`, `mask`, `n`...) and says what would be accepted, so
a person can fix the request from the message alone. Nothing rejected here reaches an upstream.
"""

from __future__ import annotations

import re
from typing import cast

from app.config.catalog import (
    KNOWN_PARAMS,
    Catalog,
    Combination,
    CustomSize,
    ModelRule,
    ParamRule,
    ResponseFormat,
)
from app.errors import InvalidRequest, ModelNotFound, PayloadTooLarge
from app.intake.form import IntakeForm
from app.intake.request import EditRequest, ImageInput, Operation, ParamValue
from app.intake.sniff import HEAD_BYTES, TAIL_BYTES, ImageInfo, SniffError, sniff_image
from app.intake.spool import SpooledUpload

# ASCII digits only: `\d` also matches other scripts' digits (Arabic-Indic, full-width), which
# int() reads but upstreams do not.
_IMAGE_FIELD = re.compile(r"^image(\[([0-9]{0,4})\])?$")
_MASK_FIELDS = ("mask", "mask[]")
_MARKUP_FIELDS = ("markup", "markup[]")
_OVERLAY_FIELDS = _MASK_FIELDS + _MARKUP_FIELDS
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_TRUE = ("true", "1")
_FALSE = ("false", "0")
QUICK_HEAD_BYTES = 16 * 1024
_STREAM_RULE = ParamRule(kind="bool", default=False)
_PARTIAL_IMAGES_RULE = ParamRule(kind="int", min=0, max=3, default=0)


def validate_edit(
    form: IntakeForm, catalog: Catalog, *, default_model: str, max_pixels: int
) -> EditRequest:
    fields = _single_valued(form)
    model = _model(fields.pop("model", None), catalog, default_model)
    prompt = _prompt(fields.pop("prompt", None), model)
    images = _images(form.files, model, max_pixels)
    mask = _overlay(form.files, "mask", model, images[0], max_pixels)
    markup = _overlay(form.files, "markup", model, images[0], max_pixels)
    _reject_unexpected_files(form.files)
    return _request(fields, model, prompt, images, mask, "edit", markup=markup)


def validate_generation(form: IntakeForm, catalog: Catalog, *, default_model: str) -> EditRequest:
    """The same rules as an edit's, for a request made of text fields alone."""
    sent = [text.name for text in form.fields] + [upload.field for upload in form.files]
    for name in sent:
        base = name.split("[", 1)[0]
        if base in ("image", "images", "mask", "markup"):
            raise InvalidRequest(
                f"A generation takes no {base}; send images to /v1/images/edits.",
                param=base,
                code="unsupported_parameter",
            )
    fields = _single_valued(form)
    model = _model(fields.pop("model", None), catalog, default_model)
    prompt = _prompt(fields.pop("prompt", None), model)
    return _request(fields, model, prompt, (), None, "generation")


def _request(
    fields: dict[str, str],
    model: ModelRule,
    prompt: str,
    images: tuple[ImageInput, ...],
    mask: ImageInput | None,
    operation: Operation,
    *,
    markup: ImageInput | None = None,
) -> EditRequest:
    partials_sent = "partial_images" in fields
    stream, partial_images = _streaming(fields, model)
    known = {name: value for name, value in fields.items() if _is_known(name, model)}
    extra = tuple((name, value) for name, value in fields.items() if not _is_known(name, model))
    params = {name: _param(name, value, model) for name, value in known.items()}
    # What was sent, by name, for the `excludes` rules: fields, the streaming switches, files.
    sent = {"stream": stream, "partial_images": partials_sent, "mask": mask, "markup": markup}
    present = set(params) | {name for name, value in sent.items() if value}
    _check_combinations(params, present, model)
    _check_translations(params, model)
    response_format = cast(ResponseFormat | None, params.get("response_format"))
    if response_format is not None and response_format not in model.response_formats:
        raise InvalidRequest(
            f"response_format={response_format!r} is not available for {model.name} on this "
            f"gateway; use {' or '.join(model.response_formats)}.",
            param="response_format",
            code="unsupported_value",
        )
    n = int(params.get("n", 1))
    params = _translate(params, model)
    for name in model.strip:
        params.pop(name, None)
    return EditRequest(
        model=model,
        prompt=prompt,
        images=images,
        mask=mask,
        markup=markup,
        params=params,
        extra_fields=extra,
        response_format=response_format,
        n=n,
        operation=operation,
        stream=stream,
        partial_images=partial_images,
    )


def _streaming(fields: dict[str, str], model: ModelRule) -> tuple[bool, int]:
    """`stream` and `partial_images`, taken out of the fields: every model can stream (the
    gateway emulates it for upstreams that cannot), so they are checked here, not per model."""
    raw_stream = fields.pop("stream", None)
    raw_partials = fields.pop("partial_images", None)
    stream = False
    if raw_stream is not None:
        stream = bool(_param("stream", raw_stream, model, _STREAM_RULE))
    partials = 0
    if raw_partials is not None:
        rule = model.params.get("partial_images", _PARTIAL_IMAGES_RULE)
        partials = int(_param("partial_images", raw_partials, model, rule))
        if not stream:
            raise InvalidRequest(
                "partial_images applies only to streaming requests (stream=true).",
                param="partial_images",
                code="invalid_value",
            )
    return stream, partials


def _is_known(name: str, model: ModelRule) -> bool:
    return name in KNOWN_PARAMS or name in model.params


def _single_valued(form: IntakeForm) -> dict[str, str]:
    fields: dict[str, str] = {}
    for text in form.fields:
        if _IMAGE_FIELD.match(text.name) or text.name in _OVERLAY_FIELDS:
            raise InvalidRequest(
                f"Invalid type for {text.name!r}: expected a file, but got a string instead.",
                param=text.name.split("[", 1)[0],
                code="invalid_type",
            )
        if text.name in fields:
            raise InvalidRequest(
                f"The field {text.name!r} was sent more than once; send it once.",
                param=text.name,
                code="duplicate_parameter",
            )
        fields[text.name] = text.value
    return fields


def _model(name: str | None, catalog: Catalog, default_model: str) -> ModelRule:
    name = default_model if name is None or name.strip() == "" else name.strip()
    model = catalog.get(name)
    if model is None:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise ModelNotFound(
            f"The model {shown!r} does not exist or is not served by this gateway; "
            "GET /v1/models lists the models it serves.",
            param="model",
        )
    return model


def _prompt(prompt: str | None, model: ModelRule) -> str:
    if prompt is None or not prompt.strip():
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.",
            param="prompt",
            code="missing_required_parameter",
        )
    if len(prompt) > model.prompt_max_chars:
        raise InvalidRequest(
            f"The prompt is {len(prompt)} characters long; {model.name} accepts at most "
            f"{model.prompt_max_chars}.",
            param="prompt",
            code="string_above_max_length",
        )
    return prompt


def _images(
    files: list[SpooledUpload], model: ModelRule, max_pixels: int
) -> tuple[ImageInput, ...]:
    indexed: list[tuple[int, int, SpooledUpload]] = []
    for arrival, upload in enumerate(files):
        match = _IMAGE_FIELD.match(upload.field)
        if match is None:
            continue
        index = int(match.group(2)) if match.group(2) else -1
        indexed.append((index, arrival, upload))
    if not indexed:
        raise InvalidRequest(
            "Missing required parameter: 'image' (send one or more image files).",
            param="image",
            code="missing_required_parameter",
        )
    # `image[N]` spellings are ordered by N; `image` and `image[]` keep their arrival order.
    if all(index >= 0 for index, _, _ in indexed):
        seen: set[int] = set()
        for index, _, upload in indexed:
            if index in seen:
                raise InvalidRequest(
                    f"The field {upload.field!r} was sent more than once.",
                    param=upload.field,
                    code="duplicate_parameter",
                )
            seen.add(index)
        indexed.sort()
    uploads = [upload for _, _, upload in indexed]
    if len(uploads) > model.images.max_count:
        raise InvalidRequest(
            f"{len(uploads)} images were sent; {model.name} accepts at most "
            f"{model.images.max_count}.",
            param="image",
            code="too_many_images",
        )
    single = len(uploads) == 1 and uploads[0].field == "image"
    return tuple(
        _image(upload, "image" if single else f"image[{position}]", model, max_pixels)
        for position, upload in enumerate(uploads)
    )


def _image(upload: SpooledUpload, param: str, model: ModelRule, max_pixels: int) -> ImageInput:
    limit = int(model.images.max_bytes)
    if upload.size > limit:
        raise PayloadTooLarge(
            f"{param} is {upload.size} bytes; {model.name} accepts images up to {limit} bytes.",
            param=param,
            code="file_too_large",
        )
    info = _sniff(upload, param, min(max_pixels, model.images.max_pixels or max_pixels))
    if info.kind not in model.images.formats:
        raise InvalidRequest(
            f"{param} is a {info.kind.upper()} image; {model.name} accepts "
            f"{', '.join(fmt.upper() for fmt in model.images.formats)}.",
            param=param,
            code="unsupported_file_format",
        )
    if model.images.square and info.width != info.height:
        raise InvalidRequest(
            f"{param} is {info.width}x{info.height}; {model.name} needs a square image.",
            param=param,
            code="invalid_image_dimensions",
        )
    return ImageInput(upload=upload, info=info, param=param)


def _sniff(
    upload: SpooledUpload, param: str, max_pixels: int, *, full_head: bool = False
) -> ImageInfo:
    if upload.size == 0:
        raise InvalidRequest(f"{param} is an empty file.", param=param, code="invalid_image")
    tail = upload.tail(TAIL_BYTES)
    # Most headers fit in a few KiB; copying HEAD_BYTES of every upload cost more than the rest
    # of validation, so the long read is only for what the short one could not settle: a JPEG
    # frame header behind large EXIF blocks, or a mask's tRNS chunk behind large metadata.
    info: ImageInfo | None
    try:
        info = sniff_image(upload.head(QUICK_HEAD_BYTES), tail, upload.size)
    except SniffError as exc:
        if upload.size <= QUICK_HEAD_BYTES:
            raise InvalidRequest(f"{param}: {exc}.", param=param, code="invalid_image") from None
        info = None
    unsettled_alpha = full_head and info is not None and info.kind == "png" and not info.has_alpha
    if info is None or (unsettled_alpha and upload.size > QUICK_HEAD_BYTES):
        try:
            info = sniff_image(upload.head(HEAD_BYTES), tail, upload.size)
        except SniffError as exc:
            raise InvalidRequest(f"{param}: {exc}.", param=param, code="invalid_image") from None
    if info.width * info.height > max_pixels:
        raise InvalidRequest(
            f"{param} claims {info.width}x{info.height} pixels; the limit is {max_pixels} pixels.",
            param=param,
            code="image_too_large",
        )
    return info


def _overlay(
    files: list[SpooledUpload],
    kind: str,
    model: ModelRule,
    first: ImageInput,
    max_pixels: int,
) -> ImageInput | None:
    """The mask or the markup: a PNG with alpha, exactly the size of the first image."""
    names = _MASK_FIELDS if kind == "mask" else _MARKUP_FIELDS
    uploads = [upload for upload in files if upload.field in names]
    if not uploads:
        return None
    rules = model.mask if kind == "mask" else model.markup
    if not rules.allowed:
        raise InvalidRequest(
            f"{model.name} does not take a {kind}.", param=kind, code="unsupported_parameter"
        )
    if len(uploads) > 1:
        raise InvalidRequest(
            f"Only one {kind} may be sent.", param=kind, code="duplicate_parameter"
        )
    upload = uploads[0]
    limit = int(rules.max_bytes)
    if upload.size > limit:
        raise PayloadTooLarge(
            f"The {kind} is {upload.size} bytes; the limit is {limit}.",
            param=kind,
            code="file_too_large",
        )
    code = f"invalid_{kind}"
    info = _sniff(upload, kind, max_pixels, full_head=True)
    if info.kind != "png":
        raise InvalidRequest(
            f"The {kind} is a {info.kind.upper()} image; it must be a PNG with an alpha channel.",
            param=kind,
            code=code,
        )
    if not info.has_alpha:
        why = (
            "transparent pixels mark the area to edit"
            if kind == "mask"
            else "the markup is drawn on a transparent layer"
        )
        raise InvalidRequest(f"The {kind} has no alpha channel; {why}.", param=kind, code=code)
    if (info.width, info.height) != (first.info.width, first.info.height):
        raise InvalidRequest(
            f"The {kind} is {info.width}x{info.height} but {first.param} is "
            f"{first.info.width}x{first.info.height}; they must be the same size.",
            param=kind,
            code=code,
        )
    return ImageInput(upload=upload, info=info, param=kind)


def _reject_unexpected_files(files: list[SpooledUpload]) -> None:
    for upload in files:
        if not _IMAGE_FIELD.match(upload.field) and upload.field not in _OVERLAY_FIELDS:
            shown = upload.field[:100]
            raise InvalidRequest(
                f"Unexpected file in field {shown!r}; files are accepted as `image`, `mask` "
                "and `markup`.",
                param=shown,
                code="unexpected_file",
            )


def _param(name: str, raw: str, model: ModelRule, rule: ParamRule | None = None) -> ParamValue:
    rule = rule or model.params.get(name)
    if rule is None:
        raise InvalidRequest(
            f"{name} is not supported by {model.name}.", param=name, code="unsupported_parameter"
        )
    value = raw.strip()
    if rule.kind == "enum":
        if value not in rule.values:
            raise _bad_value(name, raw, "one of " + ", ".join(repr(v) for v in rule.values))
        return value
    if rule.kind == "int":
        return _int(name, value, rule)
    if rule.kind == "number":
        return _number(name, value, rule)
    if rule.kind == "bool":
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _bad_value(name, raw, "true or false")
    if rule.kind == "size":
        return _size(name, value.lower(), rule)
    return raw


def _int(name: str, value: str, rule: ParamRule) -> int:
    if rule.max is None:
        bounds = f"an integer of at least {rule.min}"
    else:
        bounds = f"an integer from {rule.min} to {rule.max}"
    if not re.fullmatch(r"[+-]?[0-9]{1,10}", value):
        raise _bad_value(name, value, bounds)
    number = int(value)
    if (rule.min is not None and number < rule.min) or (rule.max is not None and number > rule.max):
        raise _bad_value(name, value, bounds)
    return number


def _number(name: str, value: str, rule: ParamRule) -> float:
    bounds = "a number"
    if rule.min is not None:
        bounds += f" from {rule.min:g}"
    if rule.max is not None:
        bounds += f" up to {rule.max:g}"
    # Plain decimals only: float() also reads "nan", "inf" and "1e3", which no upstream takes.
    if not re.fullmatch(r"[+-]?[0-9]{1,10}(\.[0-9]{1,10})?", value):
        raise _bad_value(name, value, bounds)
    number = float(value)
    if (rule.min is not None and number < rule.min) or (rule.max is not None and number > rule.max):
        raise _bad_value(name, value, bounds)
    return number


def _size(name: str, value: str, rule: ParamRule) -> str:
    if value in rule.values:
        return value
    custom = rule.custom
    match = _SIZE.match(value)
    if (
        custom is None
        or match is None
        or not _custom_size_ok(int(match.group(1)), int(match.group(2)), custom)
    ):
        expected = "one of " + ", ".join(repr(v) for v in rule.values)
        if custom is not None:
            expected += (
                f", or WxH with both sides multiples of {custom.multiple_of}, at most "
                f"{custom.max_edge} per side, {custom.min_pixels} to {custom.max_pixels} "
                "pixels, and a ratio within "
                f"1:{custom.max_ratio:g} to {custom.max_ratio:g}:1"
            )
        raise _bad_value(name, value, expected)
    return value


def _custom_size_ok(width: int, height: int, custom: CustomSize) -> bool:
    return (
        width > 0
        and height > 0
        and width % custom.multiple_of == 0
        and height % custom.multiple_of == 0
        and max(width, height) <= custom.max_edge
        and custom.min_pixels <= width * height <= custom.max_pixels
        and max(width, height) / min(width, height) <= custom.max_ratio
    )


def _bad_value(name: str, value: str, expected: str) -> InvalidRequest:
    shown = value if len(value) <= 60 else value[:60] + "..."
    return InvalidRequest(
        f"Invalid value for {name}: {shown!r}; expected {expected}.",
        param=name,
        code="invalid_value",
    )


def _check_combinations(params: dict[str, ParamValue], present: set[str], model: ModelRule) -> None:
    """The catalog's cross-field rules (`requires`, `excludes`, `when`): each sent field's rules,
    then the markup's. `present` names everything sent, files and streaming fields included."""
    for name, value in params.items():
        rule = model.params.get(name)
        if rule is None:
            continue
        for combination in rule.combinations(_text(value)):
            _check_combination(name, _text(value), combination, params, present, model)
    if "markup" in present:
        _check_combination("markup", None, model.markup, params, present, model)


def _check_combination(
    name: str,
    value: str | None,
    combination: Combination,
    params: dict[str, ParamValue],
    present: set[str],
    model: ModelRule,
) -> None:
    sent_as = name if value is None else f"{name}={value!r}"
    for other, allowed in combination.requires.items():
        other_rule = model.params.get(other)
        actual = params.get(other, other_rule.default if other_rule is not None else None)
        if actual is None or _text(actual) not in allowed:
            shown = "not sent" if actual is None else repr(_text(actual))
            raise InvalidRequest(
                f"{sent_as} needs {other} to be "
                f"{' or '.join(repr(v) for v in allowed)} (it is {shown}) on {model.name}.",
                param=name,
                code="invalid_value",
            )
    for other in combination.excludes:
        if other in present:
            raise InvalidRequest(
                f"{other} cannot be combined with {sent_as} on {model.name}.",
                param=other,
                code="unsupported_parameter",
            )


def _text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_translations(params: dict[str, ParamValue], model: ModelRule) -> None:
    for source, translation in model.translate.items():
        if source in params and translation.to in params:
            raise InvalidRequest(
                f"Send either {source} or {translation.to}, not both: {model.name} takes "
                f"{translation.to} and the gateway derives it from {source}.",
                param=source,
                code="conflicting_parameters",
            )


def _translate(params: dict[str, ParamValue], model: ModelRule) -> dict[str, ParamValue]:
    translated = dict(params)
    for source, translation in model.translate.items():
        if source not in translated:
            continue
        value = str(translated.pop(source))
        if value not in translation.map:
            accepted = ", ".join(repr(v) for v in translation.map)
            raise _bad_value(source, value, f"one of {accepted} for {model.name}")
        target = translation.map[value]
        if target is not None:
            translated[translation.to] = target
    return translated
