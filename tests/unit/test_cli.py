"""The address `image-gateway serve` binds when --host is not given."""

from __future__ import annotations

from app.cli import bind_address


def test_cli_demo_binds_loopback_unless_host_says_otherwise() -> None:
    assert bind_address(None, demo=True) == "127.0.0.1"
    assert bind_address("0.0.0.0", demo=True) == "0.0.0.0"


def test_cli_without_demo_keeps_binding_every_interface() -> None:
    assert bind_address(None, demo=False) == "0.0.0.0"
    assert bind_address("127.0.0.2", demo=False) == "127.0.0.2"
