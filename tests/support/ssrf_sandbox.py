"""A private network namespace in which every address the SSRF guard must refuse is real and
accepts connections. tests/e2e/test_ssrf.py runs it as
`unshare -rnm python -m tests.support.ssrf_sandbox`, with the cases on stdin.

Inside, the hostile addresses (loopback and cloud metadata, written in every IPv6 form that
carries an IPv4 address) are assigned to `lo`, a private /etc/hosts names them, and listeners on
ports 443, 8443 and 22 of every address count the connections made to them. `public.test`
(93.184.216.34, a stand-in for the internet) also serves redirects on port 80:
`/r?to=<Location>`. A real gateway, with https image URLs enabled and otherwise default rules,
gets one JSON edit per case; each answer and the connections that case caused are written to
stdout as JSON. The namespace has no interface but `lo`: nothing can leave it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.main import create_app
from tests.support.constants import CLIENT_KEY
from tests.support.counting_listener import CountingListener
from tests.support.gateway_env import gateway_settings
from tests.support.servers import serve_in_thread

PUBLIC = "93.184.216.34"
# Assigned to `lo`, so a connection to any of them reaches the counting listeners.
ADDRESSES = (
    PUBLIC,
    "169.254.169.254",
    "10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "::a9fe:a9fe",
    "::ffff:0:7f00:1",  # IPv4-translated
    "64:ff9b::7f00:1",  # NAT64
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1:a9fe:a9:fe00::",  # local-use NAT64, /48: 169.254.169.254 around the u octet
    "2002:7f00:1::1",  # 6to4
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254
    "fd00::1",
)
# What the namespace's DNS (its /etc/hosts) answers.
NAMES = {
    "public.test": [PUBLIC],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:169.254.169.254"],
    "compatible.test": ["::127.0.0.1"],
    "translated.test": ["::ffff:0:7f00:1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
    "nat64-local.test": ["64:ff9b:1:a9fe:a9:fe00::"],
    "sixtofour.test": ["2002:a9fe:a9fe::1"],
    "teredo.test": ["2001:0:4136:e378:8000:63bf:80ff:fffe"],
    "ula.test": ["fd00::1"],
    # One public answer and one hostile: any refused address refuses the name.
    "mixed.test": [PUBLIC, "64:ff9b::7f00:1"],
}
LISTENED_PORTS = (443, 8443, 22)


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def _set_up_network() -> None:
    _run("ip", "link", "set", "lo", "up")
    for address in ADDRESSES:
        _run("ip", "addr", "add", f"{address}/{128 if ':' in address else 32}", "dev", "lo")
    hosts = tempfile.NamedTemporaryFile("w", suffix=".hosts", delete=False)  # noqa: SIM115
    with hosts:
        hosts.write("127.0.0.1 localhost\n::1 localhost\n")
        for name, addresses in NAMES.items():
            hosts.writelines(f"{address} {name}\n" for address in addresses)
    # A mount namespace of our own: the host's /etc/hosts is untouched.
    _run("mount", "--bind", hosts.name, "/etc/hosts")


def _redirector() -> Starlette:
    async def redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"location": request.query_params["to"]})

    return Starlette(routes=[Route("/r", redirect)])


def main() -> None:
    cases: dict[str, str] = json.loads(sys.stdin.read())
    _set_up_network()
    listeners = [CountingListener("::", port) for port in LISTENED_PORTS]
    # Where the gateway's upstream is: no case may ever reach it.
    upstream = CountingListener("127.0.0.1", 8080)
    settings = gateway_settings("http://127.0.0.1:8080/v1", GATEWAY_IMAGE_URLS_ENABLED="true")
    # Plain http only so that the first hop can be public.test's redirector; every other rule
    # is the default (ports 80 and 443, no private addresses).
    image_urls = settings.image_urls.model_copy(update={"allow_http": True})
    settings = settings.model_copy(update={"image_urls": image_urls})
    results: dict[str, Any] = {}
    with (
        listeners[0],
        listeners[1],
        listeners[2],
        upstream,
        serve_in_thread(_redirector(), host=PUBLIC, port=80),
        serve_in_thread(create_app(settings)) as gateway,
        httpx.Client(base_url=gateway, timeout=60) as client,
    ):
        for case_id, image_url in cases.items():
            before = [listener.count for listener in listeners]
            try:
                response = client.post(
                    "/v1/images/edits",
                    json={"prompt": "x", "images": [{"image_url": image_url}]},
                    headers={"authorization": f"Bearer {CLIENT_KEY}"},
                )
                status, body = response.status_code, response.text
            except httpx.HTTPError as exc:  # a gateway that dropped the connection: a failure
                status, body = None, f"{type(exc).__name__}: {exc}"
            after = [listener.count for listener in listeners]
            results[case_id] = {
                "status": status,
                "body": body,
                "connections": sum(after) - sum(before),
                # Which address and port each connection was made to.
                "reached": [
                    f"[{peer}]:{listener.port}"
                    for listener, start in zip(listeners, before, strict=True)
                    for peer in listener.peers[start:]
                ],
            }
        results["upstream connections"] = upstream.count
    print("SANDBOX-RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
