"""Scrub secrets from any text that might leave the process (upstream error messages, logs).

Upstreams echo parts of the key they were given ("Incorrect API key provided: sk-ab***yz"), so
both the configured secrets and anything shaped like an API key are replaced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# OpenAI-style keys, masked or not: sk-..., sk-proj-..., and our own client key prefix.
_KEY_SHAPED = re.compile(r"\b(?:sk|igw)-[A-Za-z0-9_\-*.]{4,}")


# A masked echo keeps a key's tail ("azure-te...22bbbb0000"): of a secret this long, the last
# characters are as telling as the whole, and are replaced too. Keys without a recognisable prefix
# (Azure's hex keys, Google's AIza... keys) are only caught this way.
_TAIL = 10
_TAIL_FROM = 24


class Redactor:
    def __init__(self, secrets: Iterable[str]) -> None:
        whole = {s for s in secrets if len(s) >= 4}
        tails = {s[-_TAIL:] for s in whole if len(s) >= _TAIL_FROM}
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted(whole | tails, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _KEY_SHAPED.sub(REDACTED, text)
