"""Degraded mode: PostgreSQL goes away under load and comes back, and no memory is lost."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from proxy.db.embedded import start_embedded, stop_embedded
from tests import database_control
from tests.conftest import FIGURES, PROVIDER_KEY, Engram, User, eventually
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.anyio

StartEngram = Callable[..., AbstractContextManager[Engram]]


@dataclass(frozen=True)
class OwnDatabase:
    """A PostgreSQL of this module's own, so stopping it disturbs no other test."""

    uri: str
    data_dir: Path

    async def stop(self) -> None:
        await asyncio.to_thread(database_control.stop, self.data_dir)

    async def start(self) -> None:
        await asyncio.to_thread(database_control.start, self.data_dir)


@pytest.fixture(scope="module")
def own_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnDatabase]:
    data_dir = tmp_path_factory.mktemp("outage") / "pg"
    uri = asyncio.run(start_embedded(data_dir, cleanup_mode="delete"))
    yield OwnDatabase(uri, data_dir)
    asyncio.run(stop_embedded(data_dir))


@pytest.fixture
def outage_engram(
    start_engram: StartEngram, own_database: OwnDatabase, tmp_path: Path
) -> Iterator[Engram]:
    with start_engram(database_url=own_database.uri, home=tmp_path / "home") as engram:
        yield engram


def chat_body(text: str, stream: bool = False) -> dict[str, object]:
    return {
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


def headers_for(user: User) -> dict[str, str]:
    return {"X-Engram-Key": user.api_key, "Authorization": f"Bearer {PROVIDER_KEY}"}


async def conversations_of(database: OwnDatabase, user: User) -> int:
    connection = await asyncpg.connect(database.uri)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM conversations WHERE user_id = $1::uuid", user.id
        )
        return count
    finally:
        await connection.close()


async def ready(client: httpx.AsyncClient, engram: Engram) -> bool:
    return bool((await client.get(f"{engram.url}/readyz")).json()["status"] == "ready")


async def test_chaos_outage_under_steady_traffic(
    outage_engram: Engram, own_database: OwnDatabase, upstream: FakeOpenAI
) -> None:
    engram = outage_engram
    cached = engram.create_user()
    unknown = [engram.create_user() for _ in range(3)]  # valid keys this Engram never saw
    served: dict[str, list[tuple[float, int, str]]] = {"cached": [], "unknown": []}
    outage = {"down": False}

    async with httpx.AsyncClient(timeout=10) as client:
        warm = await client.post(
            f"{engram.url}/v1/chat/completions",
            json=chat_body("warm up"),
            headers=headers_for(cached),
        )
        assert warm.status_code == 200

        async def send(kind: str, user: User, n: int) -> None:
            answer = await client.post(
                f"{engram.url}/v1/chat/completions",
                json=chat_body(f"request {n}", stream=n % 2 == 0),
                headers=headers_for(user),
            )
            served[kind].append(
                (time.monotonic(), answer.status_code, answer.headers.get("x-engram-mode", ""))
            )

        async def traffic(stop_at: float) -> None:
            tasks, n = [], 0
            while time.monotonic() < stop_at:
                n += 1
                tasks.append(asyncio.create_task(send("cached", cached, n)))
                if outage["down"]:
                    tasks.append(asyncio.create_task(send("unknown", unknown[n % 3], n)))
                await asyncio.sleep(0.03)
            await asyncio.gather(*tasks)

        began = time.monotonic()
        load = asyncio.create_task(traffic(began + 7.0))
        await asyncio.sleep(1.0)
        await own_database.stop()
        outage["down"] = True
        await asyncio.sleep(3.0)
        outage["down"] = False
        await own_database.start()
        restarted = time.monotonic()
        await eventually(lambda: ready(client, engram), within=10, interval=0.05)
        recovery = time.monotonic() - restarted
        await load

    cached_ok = sum(status == 200 for _, status, _ in served["cached"])
    passthrough = sum(mode == "passthrough" for _, _, mode in served["cached"])
    unknown_served = sum(status == 200 for _, status, _ in served["unknown"])
    unknown_503 = sum(status == 503 for _, status, _ in served["unknown"])
    FIGURES.append(
        f"chaos: cached-key requests {len(served['cached'])}, answered {cached_ok} "
        f"({100 * cached_ok / len(served['cached']):.2f} %), in passthrough {passthrough}; "
        f"unknown-key requests during the outage {len(served['unknown'])}, served "
        f"{unknown_served}, 503 {unknown_503}; full mode back {recovery:.2f} s after the "
        f"database"
    )
    assert served["unknown"]
    assert unknown_served == 0
    assert unknown_503 == len(served["unknown"])
    assert cached_ok >= 0.99 * len(served["cached"])
    assert passthrough > 0
    assert recovery <= 5.0
    # Every exchange answered (the warm-up too) is in the database exactly once.
    await eventually(
        lambda: _count_matches(own_database, cached, cached_ok + 1), within=15, interval=0.2
    )


async def _count_matches(database: OwnDatabase, user: User, expected: int) -> bool:
    return await conversations_of(database, user) == expected


async def test_during_an_outage_other_endpoints_answer_503_and_readyz_stays_200(
    outage_engram: Engram, own_database: OwnDatabase
) -> None:
    engram = outage_engram
    user = engram.create_user()
    assert engram.get("/stats", user).status_code == 200  # the key is now cached
    await own_database.stop()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            chat = await client.post(
                f"{engram.url}/v1/chat/completions", json=chat_body("hi"), headers=headers_for(user)
            )
            assert chat.status_code == 200
            assert chat.headers["x-engram-mode"] == "passthrough"
            assert chat.headers["x-engram-memories-injected"] == "0"
            assert "x-engram-retrieval-id" not in chat.headers
            for method, path, body in [
                ("POST", "/memories/capture", {"content": "x"}),
                ("POST", "/memories/search", {"query": "x"}),
                ("GET", "/retrieval-logs", None),
                ("GET", "/stats", None),
                ("GET", "/keys", None),
            ]:
                answer = await client.request(
                    method, f"{engram.url}{path}", json=body, headers=headers_for(user)
                )
                assert answer.status_code == 503, path
                assert answer.headers["retry-after"]
                assert answer.json()["error"]["code"] == "database_unavailable"
            readyz = await client.get(f"{engram.url}/readyz")
            assert readyz.status_code == 200
            assert readyz.json() == {"status": "degraded", "database": "down"}
            assert (await client.get(f"{engram.url}/healthz")).status_code == 200
    finally:
        await own_database.start()


async def test_a_query_error_from_a_reachable_database_fails_closed(
    outage_engram: Engram, own_database: OwnDatabase, log_stream: io.StringIO
) -> None:
    engram = outage_engram
    since = log_stream.tell()
    never_seen = engram.create_user()
    connection = await asyncpg.connect(own_database.uri)
    try:
        await connection.execute("ALTER TABLE api_keys RENAME TO api_keys_elsewhere")
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(
                f"{engram.url}/v1/chat/completions",
                json=chat_body("hi"),
                headers=headers_for(never_seen),
            )
            assert answer.status_code == 500  # not served, and not passthrough
            assert answer.json()["error"]["type"] == "server_error"
            assert await ready(client, engram)  # a query error is no outage
        logged = log_stream.getvalue()[since:]
        assert '"error_class": "UndefinedTableError"' in logged
        assert "does not exist" not in logged  # the error's text (it may quote user data) stays out
    finally:
        await connection.execute("ALTER TABLE api_keys_elsewhere RENAME TO api_keys")
        await connection.close()


async def test_a_restart_with_a_journal_replays_it_exactly_once(
    start_engram: StartEngram, own_database: OwnDatabase, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    with start_engram(database_url=own_database.uri, home=home) as engram:
        user = engram.create_user()
        async with httpx.AsyncClient(timeout=10) as client:
            first = await client.post(
                f"{engram.url}/v1/chat/completions",
                json=chat_body("one"),
                headers=headers_for(user),
            )
            assert first.status_code == 200
            await eventually(lambda: _count_matches(own_database, user, 1))
            await own_database.stop()
            for n in range(5):
                answer = await client.post(
                    f"{engram.url}/v1/chat/completions",
                    json=chat_body(f"during the outage {n}", stream=n % 2 == 1),
                    headers=headers_for(user),
                )
                assert answer.headers["x-engram-mode"] == "passthrough"
        # Engram stops while the database is still away: the journal keeps the exchanges.
    journal = home / "journal" / "exchanges.jsonl"
    assert len(journal.read_text().splitlines()) == 5
    await own_database.start()
    with start_engram(database_url=own_database.uri, home=home):
        assert await conversations_of(own_database, user) == 6
    assert not journal.exists() or journal.read_text() == ""
    with start_engram(database_url=own_database.uri, home=home):  # and a second restart
        assert await conversations_of(own_database, user) == 6
