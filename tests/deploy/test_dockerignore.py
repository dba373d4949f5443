"""Acceptance: the Docker build context leaves out `.venv`, `.git`, caches and local secrets, and
keeps everything the Dockerfile copies.

The context is listed through `.dockerignore` with pathspec's gitignore matcher. Docker's matcher
differs from gitignore's in one way that matters: a pattern without a slash (`.venv`) matches only
at the top for Docker, at any depth for gitignore. Every pattern in the file is anchored (`/x`,
the top for both) or starts with `**/` (any depth for both), which the first test checks, so
both read the file alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import pathspec

from tests.support.compose import instructions
from tests.support.constants import REPO

DOCKERIGNORE = REPO / ".dockerignore"
# Left out of every build context, at the top or anywhere below it.
EXCLUDED = (
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/big.so",
    ".git/HEAD",
    ".git/objects/pack/pack-1.pack",
    "app/__pycache__/main.cpython-311.pyc",
    "app/upstream/__pycache__/demo.cpython-311.pyc",
    "__pycache__/x.pyc",
    ".mypy_cache/3.11/app/main.data.json",
    ".ruff_cache/0.6.0/123",
    ".pytest_cache/v/cache/nodeids",
    "tests/.pytest_cache/v/cache/lastfailed",
    ".hypothesis/examples/abc",
    ".coverage",
    "htmlcov/index.html",
    "image_gateway.egg-info/PKG-INFO",
    ".env",
    "config/.env",
)


def patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def spec() -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines(patterns())


def context(root: Path) -> set[str]:
    """Every file Docker would send from `root`: those .dockerignore does not exclude."""
    ignore = spec()
    found = set()
    for directory, subdirs, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        # An excluded directory is not entered (as Docker does, and .venv is large).
        subdirs[:] = [d for d in subdirs if not ignore.match_file(f"{relative / d}/")]
        for name in files:
            path = (relative / name).as_posix()
            if not ignore.match_file(path):
                found.add(path)
    return found


def copied_sources() -> list[str]:
    """What the Dockerfile's COPY instructions take from the build context."""
    sources = []
    for instruction, argument in instructions((REPO / "Dockerfile").read_text()):
        words = argument.split()
        if instruction == "COPY" and not any(word.startswith("--from") for word in words):
            sources += [word.removeprefix("./") for word in words[:-1] if not word.startswith("-")]
    return sources


def test_every_pattern_reads_the_same_for_docker_and_gitignore() -> None:
    for pattern in patterns():
        body = pattern.removeprefix("!")
        assert body.startswith(("/", "**/")), f"{pattern!r}: anchor it with / or **/"


def test_build_context_leaves_out_venv_git_caches_and_secrets(tmp_path: Path) -> None:
    kept = ("Dockerfile", "requirements.lock", "pyproject.toml", "README.md", "app/main.py")
    for path in (*EXCLUDED, *kept, "config/gateway.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    listed = context(tmp_path)
    assert listed >= {*kept, "config/gateway.yaml"}
    assert not listed & set(EXCLUDED), sorted(listed & set(EXCLUDED))


def test_build_context_of_this_checkout_holds_what_the_dockerfile_copies() -> None:
    listed = context(REPO)
    sources = copied_sources()
    assert {"requirements.lock", "pyproject.toml", "README.md", "app", "config"} <= set(sources)
    for source in sources:
        assert source in listed or any(path.startswith(source + "/") for path in listed), source
    leaked = [
        path
        for path in listed
        if path.split("/")[0] in (".venv", ".git", "tests", "docs")
        or "__pycache__" in path.split("/")
        or path.split("/")[0].endswith("_cache")
    ]
    assert not leaked, leaked[:10]
