"""Supply chain: every dependency is pinned with hashes, the lock files cover what pyproject.toml
asks for, and the Docker build installs from the lock with hash checking on."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.support.constants import REPO

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(filename: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) from a `uv pip compile --generate-hashes` file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in (REPO / filename).read_text(encoding="utf-8").splitlines():
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{filename}: a hash before any requirement"
            entries[current][1].append(line.removeprefix("--hash="))
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"{filename}: not an exact pin: {line!r}"
        current = canonical(match.group(1))
        entries[current] = (match.group(2), [])
    return entries


def declared(extra: str | None) -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"]
    if extra is not None:
        requirements = requirements + project["optional-dependencies"][extra]
    names = []
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        assert match, requirement
        names.append(canonical(match.group(1)))
    return names


@pytest.mark.parametrize(
    ("filename", "extra"), [("requirements.lock", None), ("requirements-dev.lock", "dev")]
)
def test_supply_chain_lock_pins_every_dependency_with_hashes(
    filename: str, extra: str | None
) -> None:
    entries = lock_entries(filename)
    assert entries
    for name, (_version, hashes) in entries.items():
        assert hashes, f"{filename}: {name} has no hash"
        assert all(h.startswith("sha256:") and len(h) == 71 for h in hashes), name
    missing = [name for name in declared(extra) if name not in entries]
    assert missing == [], f"{filename} lacks {missing}: regenerate it (README: Supply chain)"


def test_supply_chain_multipart_parser_is_past_known_dos_fixes() -> None:
    version, _ = lock_entries("requirements.lock")["python-multipart"]
    assert tuple(int(part) for part in version.split(".")[:3]) >= (0, 0, 32)


def test_supply_chain_docker_build_installs_from_the_lock_with_hashes() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "--require-hashes -r requirements.lock" in dockerfile
    # The app itself is installed without resolving anything the lock did not pin.
    assert re.search(r"pip install [^\n]*--no-deps \.", dockerfile)
