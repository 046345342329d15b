"""The key cache, against the real database: verified once per TTL, revocation within one TTL.

Each key fetch (and so each argon2 verification) updates api_keys.last_used_at;
a trigger installed for the test counts those updates, so the number of
verifications is read from PostgreSQL itself, nothing mocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager

import asyncpg
import httpx
import pytest

from proxy.keys import parse
from tests.conftest import Engram, User

pytestmark = pytest.mark.anyio

TTL = 0.5


@pytest.fixture(scope="module")
def short_ttl(start_engram: Callable[..., AbstractContextManager[Engram]]) -> Iterator[Engram]:
    with start_engram(auth_cache_ttl=TTL) as running:
        yield running


Counter = Callable[[User], Awaitable[int]]


@pytest.fixture
async def fetches(db: asyncpg.Connection) -> AsyncIterator[Counter]:
    """count(user) → how many times Engram fetched (and verified) that user's key."""
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS engram_test_key_fetches (
            key_id text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
        CREATE OR REPLACE FUNCTION engram_test_count_key_fetch() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO engram_test_key_fetches (key_id) VALUES (NEW.key_id);
                RETURN NEW;
            END $$;
        CREATE OR REPLACE TRIGGER engram_test_count_key_fetch
            AFTER UPDATE OF last_used_at ON api_keys
            FOR EACH ROW EXECUTE FUNCTION engram_test_count_key_fetch();
        """
    )

    async def count(user: User) -> int:
        key = parse(user.api_key)
        assert key is not None
        value: int = await db.fetchval(
            "SELECT count(*) FROM engram_test_key_fetches WHERE key_id = $1", key.key_id
        )
        return value

    try:
        yield count
    finally:
        await db.execute(
            """
            DROP TRIGGER IF EXISTS engram_test_count_key_fetch ON api_keys;
            DROP FUNCTION IF EXISTS engram_test_count_key_fetch();
            DROP TABLE IF EXISTS engram_test_key_fetches;
            """
        )


async def call(client: httpx.AsyncClient, user: User, secret: str | None = None) -> int:
    """Status of one cheap authenticated request."""
    answer = await client.get(
        "/retrieval-logs", params={"limit": "1"}, headers={"X-Engram-Key": secret or user.api_key}
    )
    return answer.status_code


async def burst(client: httpx.AsyncClient, user: User, size: int = 25) -> list[int]:
    return list(await asyncio.gather(*(call(client, user) for _ in range(size))))


async def last_used(db: asyncpg.Connection, user: User) -> object:
    return await db.fetchval("SELECT last_used_at FROM api_keys WHERE user_id = $1::uuid", user.id)


async def test_argon2_runs_once_per_key_per_ttl_under_concurrent_use(
    short_ttl: Engram, db: asyncpg.Connection, fetches: Counter
) -> None:
    user = short_ttl.create_user()
    async with httpx.AsyncClient(base_url=short_ttl.url) as client:
        assert await fetches(user) == 0
        started = time.monotonic()
        assert await burst(client, user) == [200] * 25
        cached_by = time.monotonic()
        elapsed = cached_by - started
        # Concurrent first requests share one verification.
        assert 1 <= await fetches(user) <= 1 + int(elapsed // TTL)
        first_use = await last_used(db, user)
        assert first_use is not None

        while time.monotonic() - started < TTL * 0.6:
            assert await call(client, user) == 200
        elapsed = time.monotonic() - started
        assert await fetches(user) <= 1 + int(elapsed // TTL)
        if elapsed < TTL:
            assert await last_used(db, user) == first_use

        await asyncio.sleep(max(0.0, cached_by + TTL + 0.05 - time.monotonic()))
        second = time.monotonic()
        assert await burst(client, user) == [200] * 25
        elapsed = time.monotonic() - started
        count = await fetches(user)
        assert 2 <= count <= 1 + int(elapsed // TTL)
        if time.monotonic() - second < TTL:
            assert count == 2
        assert await last_used(db, user) > first_use  # type: ignore[operator]


async def test_a_revoked_key_is_served_from_the_cache_until_its_ttl_ends_however_much_used(
    short_ttl: Engram, db: asyncpg.Connection, fetches: Counter
) -> None:
    user = short_ttl.create_user()
    async with httpx.AsyncClient(base_url=short_ttl.url) as client:
        before_first = time.monotonic()
        assert await call(client, user) == 200
        after_first = time.monotonic()
        # The key entered the cache between these two instants, so its TTL ends between
        # before_first + TTL and after_first + TTL, whatever happens meanwhile.
        expires_earliest, expires_latest = before_first + TTL, after_first + TTL
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1::uuid", user.id)

        # (sent, answered, status) of calls made as often as possible through the TTL.
        calls: list[tuple[float, float, int]] = []
        while sum(sent > expires_latest for sent, _, _ in calls) < 3:
            sent = time.monotonic()
            status = await call(client, user)
            calls.append((sent, time.monotonic(), status))
            await asyncio.sleep(0.02)

        during = [status for _, answered, status in calls if answered < expires_earliest]
        after = [status for sent, _, status in calls if sent > expires_latest]
        assert len(during) >= 3
        assert during == [200] * len(during)  # revoked in the database, still in the cache
        assert after == [401] * len(after), "the revoked key outlived its TTL: use extended it"
        refused = sum(status == 401 for _, _, status in calls)
        assert await fetches(user) == 1 + refused  # cache hits never reached the database
        answer = await client.get("/retrieval-logs", headers={"X-Engram-Key": user.api_key})
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "revoked_api_key"


async def test_a_wrong_secret_for_a_cached_key_id_is_refused_without_evicting_it(
    short_ttl: Engram, fetches: Counter
) -> None:
    user = short_ttl.create_user()
    key = parse(user.api_key)
    assert key is not None
    forged = f"egm_{key.key_id}_{'x' * len(key.secret)}"
    async with httpx.AsyncClient(base_url=short_ttl.url) as client:
        assert await call(client, user) == 200
        results = await asyncio.gather(
            *(call(client, user, forged) for _ in range(5)), *(call(client, user) for _ in range(5))
        )
        assert results == [401] * 5 + [200] * 5
        assert await fetches(user) == 1  # refused from the cached digest: no argon2, no query
        assert await call(client, user) == 200


async def test_a_key_changed_in_the_database_is_trusted_only_until_the_ttl_ends(
    short_ttl: Engram, db: asyncpg.Connection
) -> None:
    user = short_ttl.create_user()
    other = short_ttl.create_user()
    async with httpx.AsyncClient(base_url=short_ttl.url) as client:
        assert await call(client, user) == 200
        verified_at = time.monotonic()
        # Swap in another key's hash: the presented secret no longer matches the database.
        await db.execute(
            """
            UPDATE api_keys SET secret_hash = (SELECT secret_hash FROM api_keys
                                               WHERE user_id = $2::uuid)
            WHERE user_id = $1::uuid
            """,
            user.id,
            other.id,
        )
        assert await call(client, user) == 200  # the cache answered, not the database
        await asyncio.sleep(max(0.0, verified_at + TTL + 0.05 - time.monotonic()))
        assert await call(client, user) == 401
