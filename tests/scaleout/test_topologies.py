"""Acceptance 1: the cache, single-flight, key-pool and rate-limit tests, unchanged, against a
3-primary Redis Cluster and against a primary + replica + 3 Sentinels (started on loopback by
tests/support/redis_topologies.py). Each topology runs those test files in a child pytest with
GATEWAY_TEST_REDIS_TOPOLOGY set; only their tests that use the shared Redis are collected there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUITES = (
    "tests/unit/cache/test_store.py",  # lookup-or-lead script, leases
    "tests/e2e/test_cache_sdk.py",  # cache and single-flight through the SDK, two processes
    "tests/unit/tenants/test_limiter.py",  # rate limits, concurrency leases, quotas
    "tests/unit/tenants/test_keystore.py",
    "tests/unit/tenants/test_gate_usage.py",
    "tests/unit/tenants/test_replicas.py",  # limits across gateway replicas
    "tests/unit/keys/test_store.py",  # key-pool state, compare-and-set, rpm counters
    "tests/e2e/test_shared_key_state.py",  # key cooldowns across gateway processes
)
# Fewer passing tests than this means the child run lost most of its tests, not that it passed.
MIN_PASSED = 40


@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
def test_topology_runs_the_redis_suites_unchanged(topology: str) -> None:
    suites = [suite for suite in SUITES if (REPO / suite).exists()]
    env = {key: value for key, value in os.environ.items() if key != "GATEWAY_TEST_REDIS_URL"}
    env["GATEWAY_TEST_REDIS_TOPOLOGY"] = topology
    result = subprocess.run(
        # One process (-n 0): this test already runs in a worker of the outer run.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *suites],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None and int(passed.group(1)) >= MIN_PASSED, summary
    assert "skipped" not in summary and "xfail" not in summary, summary
