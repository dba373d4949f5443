"""Acceptance: `image-gateway serve --demo` + the SDK returns a real edited PNG."""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from tests.support import images
from tests.support.constants import REPO
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, wait_for_port


def cli() -> list[str]:
    script = shutil.which("image-gateway", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "app.cli"]


def test_demo_cli_serves_a_real_edit() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = subprocess.Popen(
        [*cli(), "serve", "--demo", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port)
        client = sdk_client(f"http://127.0.0.1:{port}", key="anything")
        source = images.png(96, 64, colour=(120, 120, 120))
        mask = images.mask_png(96, 64)
        result = client.images.edit(
            image=("in.png", source, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="paint it warmer",
            n=2,
        )
        assert len(result.data) == 2
        assert result.data[0].b64_json is not None
        edited = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        edited.load()
        assert edited.format == "PNG" and edited.size == (96, 64)
        original = Image.open(io.BytesIO(source)).convert("RGB")
        difference = ImageChops.difference(edited.convert("RGB"), original)
        assert difference.getbbox() is not None  # the edit changed pixels
        # Only the mask's transparent (left) half was edited.
        assert edited.convert("RGB").getpixel((90, 30)) == (120, 120, 120)
        assert edited.convert("RGB").getpixel((5, 30)) != (120, 120, 120)
        models = client.models.list()
        assert {m.owned_by for m in models.data} == {"image-gateway-demo"}
    finally:
        process.terminate()
        process.wait(timeout=20)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.partition(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_demo_without_host_listens_on_loopback_only() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = subprocess.Popen(
        [*cli(), "serve", "--demo", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_cli_refuses_to_start_without_client_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_UPSTREAM_KEYS"] = "sk-something"
    result = subprocess.run(
        [*cli(), "serve", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GATEWAY_CLIENT_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"GATEWAY_CACHE_ENABLED": "maybe"}, "environment: GATEWAY_CACHE_ENABLED: "),
        ({"GATEWAY_LIMITS__MAX_PARTS": "lots"}, "environment: GATEWAY_LIMITS__MAX_PARTS: "),
        ({"GATEWAY_CACHE": "{oops"}, "environment: GATEWAY_CACHE (or GATEWAY_CACHE__...): "),
        ({"GATEWAY_CONFIG": "gateway-with-a-key.yaml"}, ": client_keys: keys never go in"),
    ],
)
def test_cli_names_a_bad_setting_and_exits_2(
    tmp_path: Path, variables: dict[str, str], message: str
) -> None:
    (tmp_path / "gateway-with-a-key.yaml").write_text(
        f"catalog: {REPO / 'config' / 'models.yaml'}\nclient_keys: [igw-in-a-file-1111]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_UPSTREAM_KEYS="sk-something", GATEWAY_CLIENT_KEYS="igw-client")
    env.update(variables)
    result = subprocess.run(
        [*cli(), "serve", "--port", str(free_port())],
        cwd=REPO if "GATEWAY_CONFIG" not in variables else tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "igw-in-a-file-1111" not in result.stderr
