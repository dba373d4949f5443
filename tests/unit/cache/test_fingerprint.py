"""Unit: the fingerprint covers what decides the result, and nothing that does not."""

from __future__ import annotations

from dataclasses import replace

from app.cache.fingerprint import fingerprint
from tests.support import images
from tests.unit.cache.builders import edit


def test_fingerprint_fills_defaults_so_absent_and_explicit_defaults_match() -> None:
    bare = fingerprint(edit({"prompt": "x"}))
    assert bare == fingerprint(edit({"prompt": "x", "n": "1"}))
    assert bare == fingerprint(edit({"prompt": "x", "quality": "auto", "size": "auto"}))
    assert bare == fingerprint(edit({"prompt": "x", "model": "gpt-image-1.5"}))


def test_fingerprint_ignores_filename_and_response_format() -> None:
    png = images.png()
    first = fingerprint(edit({"prompt": "x"}, [("image", png, "a.png")]))
    assert first == fingerprint(edit({"prompt": "x"}, [("image[]", png, "../../etc/b.jpg")]))
    assert first == fingerprint(edit({"prompt": "x", "response_format": "url"}))


def test_fingerprint_changes_with_every_input_that_decides_the_result() -> None:
    png, other = images.png(), images.png(colour=(10, 120, 201))
    mask = images.mask_png()
    base = fingerprint(edit({"prompt": "x"}, [("image", png, "a.png")]))
    variants = [
        edit({"prompt": "y"}),
        edit({"prompt": "x"}, [("image", other, "a.png")]),
        edit({"prompt": "x"}, [("image[]", png, "a"), ("image[]", other, "b")]),
        edit({"prompt": "x"}, [("image", png, "a"), ("mask", mask, "m")]),
        edit({"prompt": "x", "model": "gpt-image-1"}),
        edit({"prompt": "x", "n": "2"}),
        edit({"prompt": "x", "size": "1024x1024"}),
        edit({"prompt": "x", "quality": "high"}),
        edit({"prompt": "x", "background": "opaque"}),
        edit({"prompt": "x", "output_format": "webp"}),
        edit({"prompt": "x", "input_fidelity": "high"}),
        edit({"prompt": "x", "user": "u1"}),
        edit({"prompt": "x", "lighting": "soft"}),  # unknown fields reach the upstream too
        edit({"prompt": "x", "model": "gpt-image-2.6-flare"}),
        edit({"prompt": "x", "model": "gpt-image-2.6-flare", "complexity": "low"}),
        edit({"prompt": "x", "model": "gpt-image-2.6-flare", "output_format": "gif"}),
        edit(
            {
                "prompt": "x",
                "model": "gpt-image-2.6-flare",
                "output_format": "gif",
                "frame_count": "4",
            }
        ),
        edit(
            {"prompt": "x", "model": "gpt-image-2.6-flare"},
            [("image", png, "a"), ("markup", images.markup_png(), "m")],
        ),
    ]
    prints = [fingerprint(v) for v in variants]
    assert base not in prints
    assert len(set(prints)) == len(prints)
    swapped = edit({"prompt": "x"}, [("image[]", other, "b"), ("image[]", png, "a")])
    assert fingerprint(swapped) not in prints  # image order matters


def test_fingerprint_scope_separates_clients_and_holds_no_key() -> None:
    request = edit({"prompt": "x"})
    shared = fingerprint(request)
    assert fingerprint(request, scope="client-1") != shared
    assert fingerprint(request, scope="client-1") != fingerprint(request, scope="client-2")
    assert len(shared) == 64 and int(shared, 16) >= 0


def test_fingerprint_aspect_ratio_and_its_translated_size_match() -> None:
    # Both reach the upstream as size=1536x1024, so both produce the same images.
    by_ratio = edit({"prompt": "x", "aspect_ratio": "16:9"})
    by_size = edit({"prompt": "x", "size": "1536x1024"})
    assert fingerprint(by_ratio) == fingerprint(by_size)
    assert fingerprint(replace(by_size, prompt="z")) != fingerprint(by_size)
