"""Acceptance: the README stays short and indexes docs/, every relative link in the docs resolves
(file and anchor), every metric name the docs mention is one the gateway exposes on `/metrics`,
and the README's Quick start test command is the one CI runs.

Metric names are checked against a real gateway's scrape, not against
app/observability/metrics.py: the names a reader types into Prometheus are the exposed ones
(`gateway_cache_lookups_total`, not the `gateway_cache_lookups` the Counter is declared with).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.servers import serve_in_thread

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS_DIR = REPO / "docs"
DOCUMENTS = [README, *sorted(DOCS_DIR.rglob("*.md"))]
CI_RUN = REPO / ".ci" / "run"
README_MAX_BYTES = 15 * 1024
METRICS_TOKEN = "docs-test-metrics-token-5b1e"

# Words shaped like metric names that are not metrics: error codes and an access-log field.
# Each must still be a string the code uses, so this list cannot hide a misspelt metric.
NOT_METRICS = frozenset(
    {"gateway_overloaded", "gateway_draining", "gateway_shutdown", "gateway_request_id"}
)

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
METRIC = re.compile(r"\bgateway_[a-z_]+")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
SAMPLE_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", re.MULTILINE)


def _prose(text: str) -> str:
    """The text without code: links inside code blocks or spans are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", document.read_text())):
        slug = _slug(heading)
        candidate, n = slug, 0
        while candidate in found:  # GitHub numbers repeated headings: slug, slug-1, slug-2...
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def relative_links(document: Path) -> Iterator[str]:
    for target in LINK.findall(_prose(document.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # https:, mailto: ...: not a file in this repository
        yield target


def broken_links(document: Path) -> list[str]:
    broken = []
    for target in relative_links(document):
        path_part, _, fragment = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and (resolved.is_dir() or resolved.suffix != ".md"):
            broken.append(f"{target} (an anchor into something that is not a document)")
        elif fragment and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def metric_names_in(document: Path) -> set[str]:
    return set(METRIC.findall(document.read_text())) - NOT_METRICS


def exposed_names(exposition: str) -> set[str]:
    """Every name a PromQL query can select: families as exposed (counters with `_total`), and
    the series histograms and summaries add."""
    names = set(SAMPLE_NAME.findall(exposition))
    for name, kind in TYPE_LINE.findall(exposition):
        names.add(name)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_count", f"{name}_sum"})
        elif kind == "summary":
            names.update({f"{name}_count", f"{name}_sum"})
    return names


@pytest.fixture(scope="module")
def exposed(fake_upstream: FakeOpenAIUpstream, redis_url: str) -> set[str]:
    """The metric names a gateway on the shipped config exposes, with Redis (so the Redis
    gauge exists) and a metrics token (so the scrape is the one Prometheus would make)."""
    settings = load_settings(
        env={
            "GATEWAY_CONFIG": str(REPO / "config" / "gateway.yaml"),
            "GATEWAY_UPSTREAM_URL": fake_upstream.url,
            "GATEWAY_UPSTREAM_KEYS": "sk-docs-test-upstream-0001",
            "GATEWAY_CLIENT_KEYS": "igw-docs-test-client-0001",
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
            # Key health of its own: gateways sharing the test Redis must not share cooldowns.
            "GATEWAY_POOL_NAMESPACE": "t-" + uuid.uuid4().hex[:12],
        }
    )
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        scrape = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert scrape.status_code == 200, scrape.text
    return exposed_names(scrape.text)


def test_readme_is_short_and_indexes_every_document() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; at most {README_MAX_BYTES}"
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for target in relative_links(README)
        if target.startswith("docs/")
    }
    top_level = {path.resolve() for path in DOCS_DIR.glob("*.md")}
    assert top_level, "docs/ holds no documents"
    assert top_level <= linked, f"not in the README's index: {sorted(top_level - linked)}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert broken_links(document) == []


def test_docs_name_only_metrics_the_gateway_exposes(exposed: set[str]) -> None:
    wrong = {
        f"{document.relative_to(REPO)}: {name}"
        for document in DOCUMENTS
        for name in metric_names_in(document)
        if name not in exposed
    }
    assert not wrong, f"metric names no /metrics exposes: {sorted(wrong)}"
    # The docs do describe the metrics (a check over nothing would pass whatever they say).
    assert metric_names_in(DOCS_DIR / "operations.md") >= {
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_cache_lookups_total",
        "gateway_redis_up",
    }


def test_words_exempted_as_not_metrics_are_used_by_the_code_and_not_metrics(
    exposed: set[str],
) -> None:
    source = "\n".join(path.read_text() for path in (REPO / "app").rglob("*.py"))
    for word in NOT_METRICS:
        assert f'"{word}"' in source, f"{word} is exempted, but the code never uses it"
        assert word not in exposed


def test_a_misspelt_metric_name_is_caught(exposed: set[str], tmp_path: Path) -> None:
    # The declared Counter name, without the `_total` the exposition adds: the README's old
    # mistake, which the check above must refuse.
    page = tmp_path / "page.md"
    page.write_text('Hit ratio: `gateway_cache_lookups{result="hit"}`.\n')
    assert metric_names_in(page) == {"gateway_cache_lookups"}
    assert "gateway_cache_lookups" not in exposed
    assert "gateway_cache_lookups_total" in exposed


def test_quick_start_test_command_is_the_one_ci_runs() -> None:
    readme = README.read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert section is not None, "README.md has no '## Quick start' section"
    blocks = [match.group(0) for match in FENCE.finditer(section.group(1))]
    commands = [line for block in blocks for line in block.splitlines()[1:-1] if line.strip()]
    ci = [
        line
        for line in CI_RUN.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert len(ci) == 1, f".ci/run should run one command, runs {ci}"
    test_commands = [line for line in commands if "pytest" in line]
    assert test_commands == ci
