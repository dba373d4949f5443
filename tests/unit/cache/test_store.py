"""Unit: the in-process LRU; integration: the Redis store against a real Redis server."""

from __future__ import annotations

import asyncio

from app.cache.store import MemoryStore, RedisStore, entry_key, file_key, lock_key
from app.shared_state.factory import open_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_store_is_bounded_by_bytes_least_recently_used_first() -> None:
    async def scenario() -> None:
        store = MemoryStore(max_bytes=250)
        await store.put_files([("a" * 32, "png", b"A" * 100)], ttl=60)
        await store.put_files([("b" * 32, "png", b"B" * 100)], ttl=60)
        assert await store.get_file("a" * 32, "png") is not None  # a is now most recent
        await store.put_files([("c" * 32, "png", b"C" * 100)], ttl=60)
        assert await store.get_files([("a" * 32, "png"), ("b" * 32, "png"), ("c" * 32, "png")]) == [
            b"A" * 100,
            None,
            b"C" * 100,
        ]
        await store.put_files([("d" * 32, "png", b"D" * 300)], ttl=60)  # larger than the budget
        assert await store.get_file("d" * 32, "png") is None

    asyncio.run(scenario())


def test_memory_store_expires_entries_and_leases() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(max_bytes=1 << 20, clock=clock)
        assert (await store.lookup("f", lead_token="t1", lease=5)).state == "lead"
        assert (await store.lookup("f", lead_token="t2", lease=5)).state == "wait"
        clock.now += 6  # a leader that vanished: its lease runs out
        assert (await store.lookup("f", lead_token="t2", lease=5)).state == "lead"
        await store.put_files([("x" * 32, "png", b"img")], ttl=10)
        clock.now += 11
        assert await store.get_file("x" * 32, "png") is None

    asyncio.run(scenario())


def test_redis_store_lookup_leads_once_and_release_needs_the_token(redis_url: str) -> None:
    async def scenario() -> None:
        client = open_redis(redis_url, timeout=1.0)
        store = RedisStore(client, timeout=1.0, retry_after=0.0)
        fingerprint = "0" * 63 + "1"
        await client.delete(entry_key(fingerprint), lock_key(fingerprint))
        assert (await store.lookup(fingerprint, lead_token="t1", lease=30)).state == "lead"
        assert (await store.lookup(fingerprint, lead_token="t2", lease=30)).state == "wait"
        await store.release(fingerprint, "t2")  # not the holder: no effect
        assert (await store.lookup(fingerprint, lead_token="t3", lease=30)).state == "wait"
        meta = b'{"body":{"created":1},"stored_at":5.0,"images":[{"id":"i","ext":"png","size":1}]}'
        await store.put_entry(fingerprint, meta, ttl=30)
        await store.release(fingerprint, "t1")
        found = await store.lookup(fingerprint, lead_token="t4", lease=30)
        assert found.state == "hit" and found.meta is not None
        assert found.meta.files == (("i", "png", {}),)
        assert 0 < await client.ttl(entry_key(fingerprint)) <= 30
        await client.delete(entry_key(fingerprint), lock_key(fingerprint))
        await client.aclose()

    asyncio.run(scenario())


def test_redis_store_keys_share_a_hash_tag_per_operation() -> None:
    fingerprint = "ab" * 32
    # Redis Cluster hashes only what is inside {...}: entry and lease land in one slot.
    assert entry_key(fingerprint).split("{")[1].split("}")[0] == fingerprint
    assert lock_key(fingerprint).split("{")[1].split("}")[0] == fingerprint
    assert file_key("id", "png") == "igw:f1:{id}:png"
