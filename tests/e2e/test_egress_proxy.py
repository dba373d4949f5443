"""Egress proxies, through a real one (tinyproxy) on loopback: the environment's HTTPS_PROXY,
HTTP_PROXY and NO_PROXY, an upstream's own `proxy:` with credentials from the environment, and
client-supplied image URLs that never take the environment's proxy. The gateway runs as its own
process, so the proxy variables reach only it, never this test process."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from app.config.settings import ImageUrlConfig
from app.upstream.egress import PROXY_VARIABLES
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_process import GatewayProcess, gateway_process
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread
from tests.support.tinyproxy import tinyproxy

PNG = images.png(32, 32)
PROXY_USER, PROXY_PASSWORD = "gateway", "Pr0xy-pass-4-tests"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA made for this run, and a certificate it signed for `localhost` (no IP address)."""
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    leaf, leaf_key, request = directory / "leaf.pem", directory / "leaf.key", directory / "leaf.csr"
    extensions = directory / "leaf.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        "-keyout", str(ca_key), "-out", str(ca),
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(leaf_key), "-out", str(request),
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(leaf),
    )  # fmt: skip
    return {"ca": ca, "cert": leaf, "key": leaf_key}


@pytest.fixture(scope="module")
def https_upstream(certificates: dict[str, Path]) -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    with serve_in_thread(
        fake.app,
        ssl_certfile=str(certificates["cert"]),
        ssl_keyfile=str(certificates["key"]),
    ) as url:
        fake.url = url + "/v1"
        yield fake


@pytest.fixture
def secure(https_upstream: FakeOpenAIUpstream) -> Iterator[FakeOpenAIUpstream]:
    https_upstream.reset()
    yield https_upstream
    https_upstream.reset()


def https_port(upstream: FakeOpenAIUpstream) -> int:
    port = urlsplit(upstream.url).port
    assert port is not None
    return port


def run_gateway(
    directory: Path,
    base_url: str,
    certificates: dict[str, Path],
    *,
    proxies: dict[str, str] | None = None,
    upstream: dict[str, Any] | None = None,
    image_urls: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AbstractContextManager[GatewayProcess]:
    """`image-gateway serve` with exactly these proxy variables (every name set, so none leaks in
    from the environment running the tests) and the test CA trusted."""
    config = write_gateway_config(
        directory,
        upstreams={
            "default": {
                "type": "openai",
                "base_url": base_url,
                "keys_env": "GATEWAY_UPSTREAM_KEYS",
                "timeouts": {"connect": 5, "total": 30},
                **(upstream or {}),
            }
        },
        cache={"enabled": False},
        logging={"level": "debug", "format": "json", "log_prompts": False},
        image_urls=image_urls or {"enabled": False},
    )
    variables = {name: "" for name in PROXY_VARIABLES}
    for name, value in (proxies or {}).items():
        variables[name.lower()] = variables[name.upper()] = value
    full_env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        "SSL_CERT_FILE": str(certificates["ca"]),
        "SSL_CERT_DIR": "",
        **variables,
        **(env or {}),
    }
    return gateway_process(full_env, directory / "gateway.log")


def edit(gateway: GatewayProcess) -> int:
    client = sdk_client(gateway.url, timeout=60)
    try:
        client.images.edit(image=("a.png", PNG, "image/png"), prompt="through the proxy")
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def tunnel_line(port: int, host: str = "localhost") -> str:
    return f"CONNECT {host}:{port} HTTP/1.1"


def no_credentials_in(text: str) -> None:
    pair = f"{PROXY_USER}:{PROXY_PASSWORD}"
    for secret in (PROXY_PASSWORD, pair, base64.b64encode(pair.encode()).decode()):
        assert secret not in text


def test_edits_go_through_the_environments_proxy_to_http_and_https_upstreams(
    tmp_path: Path,
    certificates: dict[str, Path],
    upstream: FakeOpenAIUpstream,
    secure: FakeOpenAIUpstream,
) -> None:
    port = https_port(secure)
    with tinyproxy(tmp_path, connect_ports=(port,)) as proxy:
        environment = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url}
        plain_url = upstream.url
        (tmp_path / "plain").mkdir()
        with run_gateway(tmp_path / "plain", plain_url, certificates, proxies=environment) as gw:
            assert edit(gw) == 200
        (tmp_path / "tls").mkdir()
        secure_url = f"https://localhost:{port}/v1"
        with run_gateway(tmp_path / "tls", secure_url, certificates, proxies=environment) as gw:
            assert edit(gw) == 200
        log = proxy.log()
    assert f"POST {plain_url}/images/edits HTTP/1.1" in log
    assert tunnel_line(port) in log  # the https edit went through a tunnel, verified end to end
    assert len(upstream.edits) == 1
    assert len(secure.edits) == 1


def test_a_certificate_for_another_name_is_refused_through_the_tunnel(
    tmp_path: Path, certificates: dict[str, Path], secure: FakeOpenAIUpstream
) -> None:
    port = https_port(secure)
    with tinyproxy(tmp_path, connect_ports=(port,)) as proxy:
        # The certificate names localhost, not the address.
        wrong_name = f"https://127.0.0.1:{port}/v1"
        with run_gateway(
            tmp_path, wrong_name, certificates, proxies={"HTTPS_PROXY": proxy.url}
        ) as gateway:
            assert edit(gateway) == 502
        log = gateway.output()
        assert tunnel_line(port, "127.0.0.1") in proxy.log()
    assert "upstream_unreachable" in log
    assert secure.edits == []


def test_no_proxy_sends_an_upstream_direct(
    tmp_path: Path, certificates: dict[str, Path], secure: FakeOpenAIUpstream
) -> None:
    port = https_port(secure)
    with tinyproxy(tmp_path, connect_ports=(port,)) as proxy:
        environment = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.internal,localhost"}
        url = f"https://localhost:{port}/v1"
        with run_gateway(tmp_path, url, certificates, proxies=environment) as gateway:
            assert edit(gateway) == 200
        assert tunnel_line(port) not in proxy.log()
    assert len(secure.edits) == 1


def test_an_upstreams_own_proxy_serves_with_the_environment_empty_and_hides_credentials(
    tmp_path: Path, certificates: dict[str, Path], secure: FakeOpenAIUpstream
) -> None:
    port = https_port(secure)
    auth = (PROXY_USER, PROXY_PASSWORD)
    with tinyproxy(tmp_path, connect_ports=(port,), basic_auth=auth) as proxy:
        own = {"proxy": proxy.url, "proxy_auth_env": "EGRESS_PROXY_AUTH"}
        url = f"https://localhost:{port}/v1"
        (tmp_path / "right").mkdir()
        with run_gateway(
            tmp_path / "right",
            url,
            certificates,
            upstream=own,
            env={"EGRESS_PROXY_AUTH": f"{PROXY_USER}:{PROXY_PASSWORD}"},
        ) as gateway:
            assert edit(gateway) == 200
        right_log = gateway.output()  # whole once the process has stopped
        (tmp_path / "wrong").mkdir()
        with run_gateway(
            tmp_path / "wrong",
            url,
            certificates,
            upstream=own,
            env={"EGRESS_PROXY_AUTH": f"{PROXY_USER}:not-{PROXY_PASSWORD}"},
        ) as gateway:
            assert edit(gateway) == 502  # the proxy answers 407: refused, nothing reached
        wrong_log = gateway.output()
        proxy_log = proxy.log()
    assert proxy_log.count(tunnel_line(port)) >= 2
    assert len(secure.edits) == 1
    no_credentials_in(right_log)
    no_credentials_in(wrong_log)
    assert f"not-{PROXY_PASSWORD}" not in wrong_log
    assert "/v1/images/edits" in right_log and "/v1/images/edits" in wrong_log  # logs were on


class ImageHost:
    """An https host serving one PNG (certificate for localhost), counting its downloads."""

    def __init__(self) -> None:
        self.downloads = 0
        self.port = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.downloads += 1
        headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(PNG))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": PNG})


@pytest.fixture
def image_host(certificates: dict[str, Path]) -> Iterator[ImageHost]:
    host = ImageHost()
    tls = {"ssl_certfile": str(certificates["cert"]), "ssl_keyfile": str(certificates["key"])}
    with serve_in_thread(host, **tls) as url:
        host.port = int(url.rsplit(":", 1)[1])
        yield host


def image_urls_config(port: int, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "enabled": True,
        "allowed_hosts": ["localhost"],
        "allow_private_addresses": True,
        **extra,
    }
    if "allowed_ports" in ImageUrlConfig.model_fields:  # the SSRF guard's port allowlist
        config["allowed_ports"] = [port]
    return config


def json_edit(gateway: GatewayProcess, image_url: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/images/edits",
        json={"prompt": "p", "model": "gpt-image-1.5", "images": [{"image_url": image_url}]},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
        timeout=60,
    )


def test_client_image_urls_never_take_the_environments_proxy_only_their_own(
    tmp_path: Path,
    certificates: dict[str, Path],
    upstream: FakeOpenAIUpstream,
    image_host: ImageHost,
) -> None:
    image_url = f"https://localhost:{image_host.port}/a.png"
    with tinyproxy(tmp_path, connect_ports=(image_host.port,)) as proxy:
        environment = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url}
        plain_url = upstream.url
        (tmp_path / "env").mkdir()
        with run_gateway(
            tmp_path / "env",
            plain_url,
            certificates,
            proxies=environment,
            image_urls=image_urls_config(image_host.port),
        ) as gateway:
            assert json_edit(gateway, image_url).status_code == 200
        env_log = proxy.log()
        assert image_host.downloads == 1
        (tmp_path / "own").mkdir()
        with run_gateway(
            tmp_path / "own",
            plain_url,
            certificates,
            image_urls=image_urls_config(image_host.port, proxy=proxy.url),
        ) as gateway:
            assert json_edit(gateway, image_url).status_code == 200
        own_log = proxy.log()[len(env_log) :]
    assert image_host.downloads == 2
    assert f"POST {plain_url}/images/edits" in env_log  # the upstream call took the proxy
    assert f":{image_host.port} HTTP/1.1" not in env_log  # the client's URL did not
    # With image_urls.proxy it does, and the proxy is handed the address the SSRF guard vetted,
    # not the name to resolve again.
    assert tunnel_line(image_host.port, "127.0.0.1") in own_log
    assert f"POST {plain_url}/images/edits" not in own_log  # the environment is empty here
    assert len(upstream.edits) == 2
