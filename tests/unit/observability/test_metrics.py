"""GatewayMetrics on its own: intent-named methods land in the right series, labels stay bounded."""

from __future__ import annotations

import asyncio

from app.keys.health import KeySnapshot
from app.observability.metrics import GatewayMetrics, rejection_param
from tests.support.prom import label_values, samples, total

MODELS = ("gpt-image-1.5", "dall-e-2")


def metrics() -> GatewayMetrics:
    return GatewayMetrics(models=MODELS)


def scrape(m: GatewayMetrics) -> str:
    return m.scrape().decode()


def test_rejection_param_collapses_indexes_and_buckets_unknown_names() -> None:
    assert rejection_param("image[3]") == "image"
    assert rejection_param("image[]") == "image"
    assert rejection_param("mask[]") == "mask"
    assert rejection_param("size") == "size"
    assert rejection_param("prompt") == "prompt"
    assert rejection_param("x' OR 1=1 --") == "other"
    assert rejection_param("svg[model]") == "other"
    assert rejection_param(None) == "none"


def test_metrics_rejections_never_carry_client_strings() -> None:
    m = metrics()
    for param in ("image[0]", "image[15]", "size", "evil\nname", "a" * 500, None):
        m.record_rejection(param)
    text = scrape(m)
    assert label_values(text, "gateway_validation_rejections_total", "param") == {
        "image",
        "size",
        "other",
        "none",
    }
    assert total(text, "gateway_validation_rejections_total", param="image") == 2
    assert total(text, "gateway_validation_rejections_total", param="other") == 2


def test_metrics_model_labels_come_only_from_the_catalog() -> None:
    m = metrics()
    m.record_images("gpt-image-1.5", 2)
    m.record_images("made-up-model-name", 1)
    m.record_images(None, 1)
    text = scrape(m)
    assert label_values(text, "gateway_images_returned_total", "model") == {
        "gpt-image-1.5",
        "other",
        "none",
    }
    assert total(text, "gateway_images_returned_total", model="gpt-image-1.5") == 2


def test_metrics_request_finished_counts_by_route_model_and_status_class() -> None:
    m = metrics()
    m.request_started()
    m.request_started()
    m.request_ended()
    m.request_finished(
        route="/v1/images/edits",
        model="dall-e-2",
        status=429,
        seconds=0.2,
        bytes_in=1000,
        bytes_out=120,
    )
    text = scrape(m)
    assert total(text, "gateway_requests_in_flight") == 1
    assert (
        total(
            text,
            "gateway_requests_total",
            route="/v1/images/edits",
            model="dall-e-2",
            status_class="4xx",
        )
        == 1
    )
    assert total(text, "gateway_request_duration_seconds_count", model="dall-e-2") == 1
    assert total(text, "gateway_request_bytes_total", route="/v1/images/edits") == 1000
    assert total(text, "gateway_response_bytes_total", route="/v1/images/edits") == 120


def test_metrics_upstream_outcomes_errors_retries_and_failovers() -> None:
    m = metrics()
    m.record_upstream("default", "gpt-image-1.5", "ok", 42.0)
    m.record_upstream("default", "gpt-image-1.5", "rate_limited", 0.1)
    m.record_upstream("default", "gpt-image-1.5", "timeout", 300.0)
    m.record_upstream("default", "gpt-image-1.5", "cancelled", 1.0)
    m.record_upstream("default", "gpt-image-1.5", "something new", 1.0)
    m.record_retry("default", "rate_limited")
    m.record_failover("default", "backup")
    text = scrape(m)
    assert total(text, "gateway_upstream_requests_total", upstream="default") == 5
    assert total(text, "gateway_upstream_requests_total", outcome="ok") == 1
    errors = {
        labels["kind"]: value
        for name, labels, value in samples(text)
        if name == "gateway_upstream_errors_total"
    }
    assert errors == {"rate_limited": 1, "timeout": 1, "other": 1}  # cancelled is not an error
    # 300 s lands in a real bucket, not just +Inf: buckets reach 600 s.
    assert total(text, "gateway_upstream_duration_seconds_bucket", le="300.0") == 5
    assert total(text, "gateway_upstream_duration_seconds_bucket", le="240.0") == 4
    assert total(text, "gateway_upstream_retries_total", reason="rate_limited") == 1
    assert total(text, "gateway_upstream_failovers_total", to_upstream="backup") == 1


def test_metrics_cache_hits_misses_bypasses_stores_bytes_and_joins() -> None:
    m = metrics()
    m.record_cache_lookup("gpt-image-1.5", "miss")
    m.record_cache_store("gpt-image-1.5", 5000)
    m.record_cache_lookup("gpt-image-1.5", "hit")
    m.record_cache_served("gpt-image-1.5", 5000)
    m.record_cache_lookup("gpt-image-1.5", "hit")
    m.record_cache_lookup("gpt-image-1.5", "bypass")
    m.record_cache_join("gpt-image-1.5")
    text = scrape(m)
    assert total(text, "gateway_cache_lookups_total", result="hit") == 2
    assert total(text, "gateway_cache_lookups_total", result="miss") == 1
    assert total(text, "gateway_cache_lookups_total", result="bypass") == 1
    assert total(text, "gateway_cache_stores_total") == 1
    assert total(text, "gateway_cache_stored_bytes_total") == 5000
    assert total(text, "gateway_cache_served_bytes_total") == 5000
    assert total(text, "gateway_cache_singleflight_joins_total") == 1


def test_metrics_key_state_is_read_from_the_pool_at_scrape_time() -> None:
    m = metrics()
    keys = [
        KeySnapshot("default", "default#1", "healthy"),
        KeySnapshot("default", "default#2", "cooling", "rate_limited", 12.5),
        KeySnapshot("default", "default#3", "disabled", "not-a-known-reason", 55.0),
    ]
    m.watch_keys(lambda: keys)
    asyncio.run(m.refresh_keys())
    text = scrape(m)
    state = {
        (labels["key"], labels["state"], labels["reason"])
        for name, labels, value in samples(text)
        if name == "gateway_upstream_key_state" and value == 1
    }
    assert state == {
        ("default#1", "healthy", "ok"),
        ("default#2", "cooling", "rate_limited"),
        ("default#3", "disabled", "other"),
    }
    assert total(text, "gateway_upstream_key_cooldown_seconds", key="default#2") == 12.5
    # The next scrape sees the pool as it is then, not as it was.
    keys[1] = KeySnapshot("default", "default#2", "healthy")
    asyncio.run(m.refresh_keys())
    text = scrape(m)
    assert total(text, "gateway_upstream_key_state", key="default#2", state="healthy") == 1
    assert total(text, "gateway_upstream_key_state", key="default#2", state="cooling") == 0
    assert total(text, "gateway_upstream_key_cooldown_seconds", key="default#2") == 0


def test_metrics_redis_errors_and_up() -> None:
    m = metrics()
    m.record_redis_error("cache")
    m.record_redis_error("keys")
    m.record_redis_error("an arbitrary component")
    m.set_redis_up(False)
    text = scrape(m)
    assert label_values(text, "gateway_redis_errors_total", "component") == {
        "cache",
        "keys",
        "other",
    }
    assert total(text, "gateway_redis_up") == 0


def test_metrics_instances_do_not_share_values() -> None:
    first, second = metrics(), metrics()
    first.record_images("dall-e-2", 3)
    assert total(scrape(second), "gateway_images_returned_total") == 0
    assert total(scrape(first), "gateway_images_returned_total") == 3


def test_metrics_redis_up_is_absent_until_a_check_ran() -> None:
    m = metrics()
    assert "gateway_redis_up" not in scrape(m)  # no Redis configured: not "down"
    m.set_redis_up(True)
    assert total(scrape(m), "gateway_redis_up") == 1


def test_metrics_key_sources_may_be_async_and_a_failing_one_keeps_the_last_view() -> None:
    m = metrics()
    healthy = [KeySnapshot("bfl", "bfl#1", "healthy")]
    fail = False

    async def shared_state() -> list[KeySnapshot]:  # as a Redis-backed pool answers
        if fail:
            raise ConnectionError("redis went away")
        return healthy

    m.watch_keys(shared_state)
    asyncio.run(m.refresh_keys())
    assert total(scrape(m), "gateway_upstream_key_state", key="bfl#1", state="healthy") == 1
    fail = True
    asyncio.run(m.refresh_keys())
    assert total(scrape(m), "gateway_upstream_key_state", key="bfl#1", state="healthy") == 1


def test_metrics_client_labels_are_configured_names_only() -> None:
    m = GatewayMetrics(models=MODELS, clients=("anonymous", "client-1", "design"))
    m.record_client_edit("design", "dall-e-2", outcome="ok", images=2, cost_usd=0.04)
    m.record_client_edit("design", "dall-e-2", outcome="cache_hit", images=1, cost_usd=0.0)
    m.record_client_edit("igw-someones-key", "nonsense", outcome="weird", images=1, cost_usd=1)
    m.record_client_refusal("design", "images_per_day")
    m.record_client_refusal("design", "made-up limit")
    text = scrape(m)
    assert label_values(text, "gateway_client_requests_total", "client") == {"design", "other"}
    assert label_values(text, "gateway_client_requests_total", "outcome") == {
        "ok",
        "cache_hit",
        "other",
    }
    assert total(text, "gateway_client_images_total", client="design", source="upstream") == 2
    assert total(text, "gateway_client_images_total", client="design", source="cache") == 1
    assert total(text, "gateway_client_cost_usd_total", client="design") == 0.04
    assert label_values(text, "gateway_client_refusals_total", "limit") == {
        "images_per_day",
        "other",
    }
    assert "igw-someones-key" not in text
