"""Names every test agrees on: the repository, the configs tests start from, and the keys the test
gateways accept and present upstream."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "gateway.yaml"
MODELS = REPO / "config" / "models.yaml"
SINGLE_ATTEMPT_CONFIG = REPO / "tests" / "support" / "single_attempt.yaml"
CLIENT_KEY = "igw-test-client-key-0123456789abcdef"
UPSTREAM_KEYS = ("sk-test-upstream-AAAA1111aaaa", "sk-test-upstream-BBBB2222bbbb")
