"""Acceptance 5 (issue 15): JSON edits whose image URL leads, by any road, to an address or port
the SSRF guard refuses get a 400 in OpenAI's envelope, and no connection is made.

The roads: the address written in the URL (IPv4 carried in IPv6 as mapped, compatible,
translated, NAT64, local-use NAT64, 6to4 and Teredo addresses), what DNS answers for a name, a
port outside the allowlist, and a redirect to any of those or to a Location httpx cannot parse.
To make "no connection" mean something, the whole exchange runs in a private network namespace
(tests/support/ssrf_sandbox.py) in which every one of those addresses is real, and listeners on
it count every connection; two control cases show that a URL the rules let through is counted.
Nothing leaves the namespace: it has only `lo`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ssrf_sandbox import NAMES

REPO = Path(__file__).resolve().parents[2]
NON_PUBLIC = "resolves to a non-public address"

LITERALS = {
    "mapped-loopback": "https://[::ffff:127.0.0.1]/x.png",
    "mapped-metadata": "https://[::ffff:169.254.169.254]/x.png",
    "compatible-loopback": "https://[::127.0.0.1]/x.png",
    "compatible-metadata": "https://[::a9fe:a9fe]/x.png",
    "translated-loopback": "https://[::ffff:0:7f00:1]/x.png",
    "nat64-loopback": "https://[64:ff9b::7f00:1]/x.png",
    "nat64-metadata": "https://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "nat64-local-metadata": "https://[64:ff9b:1:a9fe:a9:fe00::]/latest/meta-data/",
    "6to4-loopback": "https://[2002:7f00:1::1]/x.png",
    "6to4-metadata": "https://[2002:a9fe:a9fe::1]/latest/meta-data/",
    "teredo-loopback": "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/x.png",
    "teredo-metadata": "https://[2001:0:4136:e378:8000:63bf:5601:5601]/x.png",
    "metadata": "https://169.254.169.254/latest/meta-data/",
    "unique-local": "https://[fd00::1]/x.png",
}
BY_DNS = {f"dns-{name}": f"https://{name}/x.png" for name in NAMES if name != "public.test"}
PORTS = {
    "port-8443": ("https://public.test:8443/x.png", "port 8443 is not an allowed port"),
    "port-22": ("https://public.test:22/x.png", "port 22 is not an allowed port"),
    "port-0": ("https://public.test:0/x.png", "port 0 is not an allowed port"),
    "port-65536": ("https://public.test:65536/x.png", "port 65536 is not an allowed port"),
    "port-99999": ("https://public.test:99999/x.png", "port 99999 is not an allowed port"),
    "port-on-a-literal": ("https://[::ffff:127.0.0.1]:22/x.png", "port 22 is not an allowed port"),
}
UNPARSEABLE = "redirected to a URL that cannot be parsed"
REDIRECTS = {
    "redirect-nat64-metadata": ("https://[64:ff9b::a9fe:a9fe]/latest/meta-data/", NON_PUBLIC),
    "redirect-compatible-loopback": ("https://[::127.0.0.1]/x.png", NON_PUBLIC),
    "redirect-6to4-metadata": ("https://[2002:a9fe:a9fe::1]/x.png", NON_PUBLIC),
    "redirect-dns-teredo": ("https://teredo.test/x.png", NON_PUBLIC),
    "redirect-dns-mixed": ("https://mixed.test/x.png", NON_PUBLIC),
    "redirect-port": ("https://public.test:8443/x.png", "port 8443 is not an allowed port"),
    "redirect-unparseable": ("https:\\\\127.0.0.1\\x", UNPARSEABLE),
    "redirect-unparseable-metadata": ("https:\\\\169.254.169.254\\latest\\meta-data", UNPARSEABLE),
}
# What the rules let through is connected to, and counted: the listeners do see connections.
CONTROLS = {
    "control-public": "https://public.test/x.png",
    "control-redirect-to-public": "https://public.test/x.png",
}


def redirect_via_public(location: str) -> str:
    return "http://public.test/r?" + str(httpx.QueryParams(to=location))


CASES: dict[str, tuple[str, str]] = {
    **{case: (url, NON_PUBLIC) for case, url in LITERALS.items()},
    **{case: (url, NON_PUBLIC) for case, url in BY_DNS.items()},
    **PORTS,
    **{case: (redirect_via_public(loc), reason) for case, (loc, reason) in REDIRECTS.items()},
}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Any]:
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's `unshare` is needed (apt-get install util-linux)"
    assert shutil.which("ip") is not None, "iproute2's `ip` is needed (apt-get install iproute2)"
    urls = {case: url for case, (url, _) in CASES.items()}
    urls["control-public"] = CONTROLS["control-public"]
    urls["control-redirect-to-public"] = redirect_via_public(CONTROLS["control-redirect-to-public"])
    # -r: root in a user namespace of our own, which may configure its network and mounts;
    # -n: a network namespace with only `lo`; -m: a mount namespace for a private /etc/hosts.
    done = subprocess.run(
        [unshare, "-rnm", sys.executable, "-m", "tests.support.ssrf_sandbox"],
        input=json.dumps(urls),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    marker = "SANDBOX-RESULTS "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    results: dict[str, Any] = json.loads(lines[-1].removeprefix(marker))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_ssrf_json_edit_image_url_is_refused_with_400_and_nothing_connected(
    outcomes: dict[str, Any], case: str
) -> None:
    _, reason = CASES[case]
    outcome = outcomes[case]
    assert outcome["status"] == 400, outcome
    error = json.loads(outcome["body"])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == ("images[0]", "invalid_image_url")
    assert reason in error["message"], error["message"]
    # Bounded, and what the URL's author wrote is never echoed raw.
    assert len(error["message"]) < 300 and "\\x" not in error["message"]
    assert outcome["connections"] == 0, outcome["reached"]


@pytest.mark.parametrize("case", list(CONTROLS))
def test_ssrf_listeners_count_what_the_rules_let_through(
    outcomes: dict[str, Any], case: str
) -> None:
    outcome = outcomes[case]
    # Connected to public.test:443, whose listener hangs up: the download fails, cleanly.
    assert outcome["connections"] == 1 and outcome["reached"] == ["[::ffff:93.184.216.34]:443"]
    assert outcome["status"] == 400
    assert "Downloading the image failed" in json.loads(outcome["body"])["error"]["message"]


def test_ssrf_no_case_reached_the_upstream(outcomes: dict[str, Any]) -> None:
    assert outcomes["upstream connections"] == 0
