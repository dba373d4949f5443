"""Acceptance: a real `image-gateway serve` process writes one JSON line per request, and none
of the upstream keys, client keys, metrics token or prompts it handled appear in its output."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.gateway_env import gateway_env
from tests.support.gateway_process import gateway_process
from tests.support.sdk import sdk_client

PROMPT = "a lighthouse at dusk, prompt-marker-51c0ffee"
METRICS_TOKEN = "metrics-token-cafe0123456789"
WRONG_CLIENT_KEY = "sk-presented-but-wrong-0000abcd"


def json_lines(output: str) -> list[dict[str, object]]:
    lines = []
    for line in output.splitlines():
        if line.strip():
            lines.append(json.loads(line))  # every line is JSON, or this raises
    return lines


def test_access_log_has_one_json_line_per_request_and_no_secrets(
    upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    env = gateway_env(upstream.url, GATEWAY_METRICS_TOKEN=METRICS_TOKEN)
    request_ids: dict[str, int] = {}
    with gateway_process(env, tmp_path / "gateway.log") as gateway:
        client = sdk_client(gateway.url)
        png = images.png(64, 64)
        raw = client.images.with_raw_response.edit(image=("a.png", png, "image/png"), prompt=PROMPT)
        request_ids[raw.headers["x-request-id"]] = 200
        # The upstream's own request id is passed on to the client, and logged as the one it saw.
        upstream.enqueue(Reply(headers={"x-request-id": "req_upstream_0042"}))
        raw = client.images.with_raw_response.edit(image=("a.png", png, "image/png"), prompt="y")
        assert raw.headers["x-request-id"] == "req_upstream_0042"
        request_ids["req_upstream_0042"] = 200
        # The upstream echoes the key it was given in its error messages.
        upstream.enqueue(
            Reply(401, {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEYS[0]}"}}),
            Reply(500, {"error": {"message": f"internal error for {UPSTREAM_KEYS[1]}"}}),
        )
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as failed:
                client.images.edit(image=("a.png", png, "image/png"), prompt=PROMPT)
            request_ids[str(failed.value.request_id)] = 502
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.edit(image=("a.png", png, "image/png"), prompt=PROMPT, n=99)
        request_ids[str(refused.value.request_id)] = 400
        intruder = sdk_client(gateway.url, key=WRONG_CLIENT_KEY)
        with pytest.raises(openai.AuthenticationError) as denied:
            intruder.images.edit(image=("a.png", png, "image/png"), prompt=PROMPT)
        request_ids[str(denied.value.request_id)] = 401
        scrape = httpx.get(
            gateway.url + "/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}
        )
        assert scrape.status_code == 200
        request_ids[scrape.headers["x-request-id"]] = 200
        gateway.terminate()
        assert gateway.process.wait(timeout=30) == 0
        output = gateway.output()

    for secret in (*UPSTREAM_KEYS, CLIENT_KEY, METRICS_TOKEN, WRONG_CLIENT_KEY, "prompt-marker"):
        assert secret not in output, f"{secret[:12]}... leaked into the log"
    lines = json_lines(output)
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert sorted(str(line["request_id"]) for line in access) == sorted(request_ids)
    for line in access:
        assert line["status"] == request_ids[str(line["request_id"])]
    passed_on = next(line for line in access if line["request_id"] == "req_upstream_0042")
    assert str(passed_on["gateway_request_id"]).startswith("req_")
    assert passed_on["gateway_request_id"] != "req_upstream_0042"
    assert "HTTP/1.1" not in output  # uvicorn's own access log is off: nothing logged twice

    success = next(line for line in access if line["route"] == "/v1/images/edits")
    assert success["route"] == "/v1/images/edits"
    assert success["client_id"] == "client-1"
    assert success["model"] == "gpt-image-1.5"
    assert success["upstream"] == "default"
    assert success["key_id"] in ("default#1", "default#2")
    assert success["attempts"] == 1
    assert success["prompt_chars"] == len(PROMPT)
    assert success["images_in"] == 1 and success["images_out"] == 1
    assert success["upload_bytes"] == len(png)
    assert int(success["bytes_in"]) > len(png)  # type: ignore[call-overload]
    assert int(success["bytes_out"]) > 0  # type: ignore[call-overload]
    assert isinstance(success["duration_ms"], float)
    assert success["cache"] == "bypass"  # the test gateways run with the cache off
    auth_failure = next(line for line in access if line["status"] == 502)
    assert auth_failure["failure"] in ("auth", "server")
    rejected = next(line for line in access if line["status"] == 400)
    assert rejected["error_param"] == "n" and rejected["upstream"] is None
    denied_line = next(line for line in access if line["status"] == 401)
    assert denied_line["client_id"] is None


def test_access_log_includes_prompts_only_when_configured(
    upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    source = Path(__file__).resolve().parents[2] / "config"
    config.write_text(
        (source / "gateway.yaml").read_text().replace("log_prompts: false", "log_prompts: true")
    )
    (tmp_path / "models.yaml").write_text((source / "models.yaml").read_text())
    env = gateway_env(upstream.url, GATEWAY_CONFIG=str(config))
    with gateway_process(env, tmp_path / "gateway.log") as gateway:
        client = sdk_client(gateway.url)
        client.images.edit(image=("a.png", images.png(), "image/png"), prompt=PROMPT)
        gateway.terminate()
        assert gateway.process.wait(timeout=30) == 0
        output = gateway.output()
    access = [line for line in json_lines(output) if line["logger"] == "gateway.access"]
    assert [line["prompt"] for line in access] == [PROMPT]
    assert CLIENT_KEY not in output and UPSTREAM_KEYS[0] not in output
