"""The admin API for client keys, in-process over a real port and a real Redis: shown once,
listed without secrets, revoked by id, every change in the audit log (ids only)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.servers import serve_in_thread

ADMIN = {"authorization": "Bearer igw-admin-" + secrets.token_hex(8)}


@pytest.fixture(scope="module")
def admin_url(
    fake_upstream: FakeOpenAIUpstream,
    clients_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    config = write_gateway_config(
        Path(tmp_path_factory.mktemp("admin")),
        redis_url=clients_redis_url,
        clients={"namespace": "adm-" + secrets.token_hex(4), "named": {"ops": {}, "art": {}}},
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_URL": fake_upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_ADMIN_KEYS": ADMIN["authorization"].removeprefix("Bearer "),
    }
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        yield url


def test_admin_key_lifecycle_is_audited_without_the_key(
    admin_url: str, upstream: FakeOpenAIUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.admin")
    created = httpx.post(admin_url + "/admin/clients/ops/keys", headers=ADMIN).json()
    key, key_id = created["key"], created["id"]
    assert created["label"] is None and created["client"] == "ops"
    edit = httpx.post(
        admin_url + "/v1/images/edits",
        headers={"authorization": f"Bearer {key}"},
        files={"image": ("a.png", images.png(), "image/png")},
        data={"prompt": "audit " + secrets.token_hex(4)},
    )
    assert edit.status_code == 200, edit.text

    # Another client cannot revoke it by id, nor can an unknown id be revoked.
    wrong_owner = httpx.delete(admin_url + f"/admin/clients/art/keys/{key_id}", headers=ADMIN)
    assert wrong_owner.status_code == 404
    assert (
        httpx.delete(admin_url + "/admin/clients/ops/keys/key_0", headers=ADMIN).status_code == 404
    )
    revoked = httpx.delete(admin_url + f"/admin/clients/ops/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200
    refused = httpx.get(admin_url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert refused.status_code == 401

    audit = [r for r in caplog.records if r.name == "gateway.admin"]
    assert [r.getMessage() for r in audit] == [
        f"client key created: client=ops id={key_id}",
        f"client key revoked: client=ops id={key_id}",
    ]
    assert key not in caplog.text


def test_admin_key_label_is_validated(admin_url: str) -> None:
    too_long = httpx.post(
        admin_url + "/admin/clients/ops/keys", headers=ADMIN, json={"label": "x" * 101}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["type"] == "invalid_request_error"
    unknown_field = httpx.post(
        admin_url + "/admin/clients/ops/keys", headers=ADMIN, json={"client": "art"}
    )
    assert unknown_field.status_code == 400


def test_admin_show_client_and_list(admin_url: str) -> None:
    shown = httpx.get(admin_url + "/admin/clients/art", headers=ADMIN).json()
    assert shown["name"] == "art" and shown["models"] is None
    assert shown["quota_used"] == {"images_today": 0, "images_this_month": 0}
    names = [
        c["name"] for c in httpx.get(admin_url + "/admin/clients", headers=ADMIN).json()["data"]
    ]
    assert sorted(names) == ["anonymous", "art", "ops"]
    assert httpx.get(admin_url + "/admin/clients/nobody", headers=ADMIN).status_code == 404


def test_gateway_with_redis_down_fails_open_and_says_so(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    from tests.support import prom
    from tests.support.servers import free_port

    key = "igw-team-" + secrets.token_hex(8)
    config = write_gateway_config(
        tmp_path,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        clients={
            "named": {
                "team": {
                    "keys_env": "TEAM_KEYS",
                    "limits": {"requests_per_minute": 1, "images_per_day": 1},
                }
            }
        },
        cache={"enabled": False},
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_URL": fake_upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_ADMIN_KEYS": ADMIN["authorization"].removeprefix("Bearer "),
        "TEAM_KEYS": key,
    }
    headers = {"authorization": f"Bearer {key}"}
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        for _ in range(2):  # over both limits, yet served: limits fail open
            response = httpx.post(
                url + "/v1/images/edits",
                headers=headers,
                files={"image": ("a.png", images.png(), "image/png")},
                data={"prompt": "x", "n": "1"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        assert httpx.post(url + "/admin/clients/team/keys", headers=ADMIN).status_code == 503
        assert httpx.get(url + "/admin/usage", headers=ADMIN).status_code == 503
        scrape = httpx.get(url + "/metrics", headers=headers).text
        for component in ("client_limits", "client_usage", "keys"):
            assert prom.total(scrape, "gateway_redis_errors_total", component=component) >= 1
    assert len(upstream.edits) == 2
