"""The cache key of an edit: sha256 over a canonical form of everything that decides the result.

Normalized values only (defaults filled in, so `n` absent and `n=1` match), image bytes by their
sha256 in order; never a filename, a part Content-Type or any key. `response_format` is left out:
the gateway renders the stored bytes as base64 or as its own URL, whichever the client asks for.
"""

from __future__ import annotations

import hashlib

import orjson

from app.intake.request import EditRequest, ParamValue

# Bump when the canonical form or the entry format changes: old entries then simply miss.
FINGERPRINT_VERSION = 3
# Fields that shape the response, not the images, or that the gateway never forwards.
_NOT_IN_FINGERPRINT = frozenset({"response_format", "stream", "partial_images"})


def normalized_params(edit: EditRequest) -> dict[str, ParamValue]:
    """The params the upstream receives, plus the model's defaults for those left out."""
    params = {k: v for k, v in edit.params.items() if k not in _NOT_IN_FINGERPRINT}
    translated_away = set(edit.model.translate) | set(edit.model.strip)
    for name, rule in edit.model.params.items():
        if (
            rule.default is None
            or name in params
            or name in _NOT_IN_FINGERPRINT
            or name in translated_away
        ):
            continue
        params[name] = rule.default
    return params


def fingerprint(edit: EditRequest, *, scope: str | None = None) -> str:
    """Hex sha256 of the edit's canonical form; `scope` keeps clients apart (per-client cache)."""
    canonical = {
        "v": FINGERPRINT_VERSION,
        # A generation and an edit never share an entry, even if nothing else told them apart.
        "op": edit.operation,
        "scope": scope,
        "model": edit.model.name,
        "prompt": edit.prompt,
        "params": normalized_params(edit),
        "extra": sorted([name, value] for name, value in edit.extra_fields),
        "images": [image.sha256 for image in edit.images],
        "mask": edit.mask.sha256 if edit.mask is not None else None,
        "markup": edit.markup.sha256 if edit.markup is not None else None,
    }
    encoded = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(encoded).hexdigest()
