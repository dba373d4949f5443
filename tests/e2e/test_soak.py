"""Acceptance 5 (issue 18), its runnable half: `python -m tests.bench.soak` runs from the checkout
as it is, drives every fault phase against a real Redis and the fake upstream, prints its table
and writes its JSON. One-second phases keep it short. What the rows say (no 5xx made by the
gateway, no client hung, a clean drain) is the soak's own verdict on a full-length run; here it
only has to be reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.soak import PHASES, SIGTERM_PHASE

REPO = Path(__file__).resolve().parents[2]
DRAIN_TIMEOUT = 3


def test_soak_runs_every_phase_prints_its_table_and_writes_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.soak",
            "--phase-seconds",
            "1",
            "--latency",
            "0.2",
            "--concurrency",
            "4",
            "--client-timeout",
            "5",
            "--drain-timeout",
            str(DRAIN_TIMEOUT),
            "--results",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    # 1 is a verdict (a failing check), not a crash: the soak still reports.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    names = [phase.name for phase in PHASES] + [SIGTERM_PHASE]
    for name in names:
        assert f"| {name} |" in done.stdout, done.stdout
    assert "no 5xx made by the gateway" in done.stdout

    (written,) = tmp_path.glob("soak-2*.json")
    report = json.loads(written.read_text())
    assert json.loads((tmp_path / "soak-latest.json").read_text()) == report
    assert written.with_suffix(".log").exists()
    rows = {row["phase"]: row for row in report["phases"]}
    assert list(rows) == names
    baseline = rows["baseline"]
    assert baseline["2xx"] > 0 and baseline["p50_ms"] is not None
    assert baseline["rss_mb"] > 0 and baseline["open_fds"] > 0 and baseline["redis_keys"] > 0
    assert rows["Redis down, back empty"]["redis_keys"] is None  # sampled while it was down
    assert sum(row["4xx bad"] for row in rows.values()) > 0
    assert rows[SIGTERM_PHASE]["requests"] > 0  # clients kept coming after the signal
    assert report["drain"]["signalled_at"] is not None
    assert set(report["verdict"]["checks"]) >= {
        "no 5xx made by the gateway",
        "no client timed out",
        "the gateway exited 0",
        "no traceback logged",
    }
