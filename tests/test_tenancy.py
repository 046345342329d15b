"""One user's memories and logs never reach another user: prompts, search, logs, headers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from proxy.injection import BLOCK_START
from tests.conftest import PROVIDER_KEY, Engram, User, eventually
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.anyio

ALICE_MEMORIES = [
    "My favourite drink is espresso with a drop of milk",
    "I live in Porto, near the river",
    "My daughter is called Ana",
]
BOB_MEMORIES = [
    "My favourite drink is green tea with jasmine",
    "I live in Lisbon, in Alfama",
    "My daughter is called Beatriz",
]
QUESTIONS = [
    "What is my favourite drink?",
    "Where do I live?",
    "What is my daughter called?",
]


@dataclass(frozen=True)
class Tenant:
    user: User
    memory_ids: frozenset[str]
    memories: tuple[str, ...]


@dataclass(frozen=True)
class Pair:
    alice: Tenant
    bob: Tenant


def tenant(engram: Engram, memories: list[str]) -> Tenant:
    user = engram.create_user()
    ids = [engram.capture(user, content)["id"] for content in memories]
    return Tenant(user, frozenset(ids), tuple(memories))


@pytest.fixture(scope="module")
def pair(engram: Engram) -> Pair:
    """Alice and Bob, with memories on the same topics (shared by the module's tests)."""
    return Pair(tenant(engram, ALICE_MEMORIES), tenant(engram, BOB_MEMORIES))


def chat(engram: Engram, user: User, question: str, **headers: str) -> httpx.Response:
    return engram.post(
        "/v1/chat/completions",
        user,
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]},
        headers={"Authorization": f"Bearer {PROVIDER_KEY}", **headers},
    )


def system_sent_for(upstream: FakeOpenAI, question: str) -> str:
    [received] = [r for r in upstream.received if r.messages[-1]["content"] == question]
    return received.system_text


@pytest.mark.parametrize("question", QUESTIONS)
async def test_each_user_prompt_holds_only_their_own_memories(
    engram: Engram, upstream: FakeOpenAI, pair: Pair, question: str
) -> None:
    for me, other in ((pair.alice, pair.bob), (pair.bob, pair.alice)):
        asked = f"{question} ({me.user.id})"
        answer = chat(engram, me.user, asked)
        assert answer.status_code == 200, answer.text
        assert int(answer.headers["x-engram-memories-injected"]) >= 1
        system = system_sent_for(upstream, asked)
        assert BLOCK_START in system
        assert any(memory in system for memory in me.memories)
        for memory in other.memories:
            assert memory not in system


async def test_a_user_without_memories_gets_none_of_anyone_elses(
    engram: Engram, upstream: FakeOpenAI, pair: Pair
) -> None:
    newcomer = engram.create_user()
    for question in QUESTIONS:
        answer = chat(engram, newcomer, question)
        assert answer.headers["x-engram-memories-injected"] == "0"
        assert "x-engram-retrieval-id" not in answer.headers
        assert system_sent_for(upstream, question) == ""


async def test_search_only_finds_the_callers_memories(engram: Engram, pair: Pair) -> None:
    for me, other in ((pair.alice, pair.bob), (pair.bob, pair.alice)):
        for query in [*QUESTIONS, *other.memories]:
            answer = engram.post(
                "/memories/search", me.user, {"query": query, "limit": 100, "threshold": -1}
            )
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            # threshold -1 returns everything the caller may see: exactly their own.
            assert {result["id"] for result in results} == me.memory_ids
            assert {result["content"] for result in results} == set(me.memories)


async def test_retrieval_logs_only_list_the_callers_calls(
    engram: Engram, db: asyncpg.Connection, pair: Pair
) -> None:
    marker = uuid.uuid4().hex
    for me in (pair.alice, pair.bob):
        for question in QUESTIONS:
            assert chat(engram, me.user, f"{question} {marker}").status_code == 200

    async def logged(user: User) -> set[str]:
        rows = await db.fetch(
            "SELECT id, query_text FROM retrieval_logs WHERE user_id = $1::uuid", user.id
        )
        ours = [row for row in rows if marker in row["query_text"]]
        return {str(row["id"]) for row in rows} if len(ours) == len(QUESTIONS) else set()

    for me, other in ((pair.alice, pair.bob), (pair.bob, pair.alice)):
        mine = await eventually(lambda me=me: logged(me.user))  # type: ignore[misc]
        answer = engram.get("/retrieval-logs", me.user, params={"limit": "100"})
        assert answer.status_code == 200, answer.text
        entries = answer.json()["data"]
        assert {entry["id"] for entry in entries} == mine
        for entry in entries:
            assert {memory["id"] for memory in entry["memories"]} <= me.memory_ids
            for memory in entry["memories"]:
                assert memory["content"] not in other.memories


async def test_another_users_log_id_as_cursor_reveals_nothing(
    engram: Engram, db: asyncpg.Connection, pair: Pair
) -> None:
    for me in (pair.alice, pair.bob):
        for question in QUESTIONS:
            assert chat(engram, me.user, question).status_code == 200
    bob_logs = await eventually(
        lambda: db.fetch(
            "SELECT id FROM retrieval_logs WHERE user_id = $1::uuid ORDER BY created_at DESC",
            pair.bob.user.id,
        )
    )
    bob_ids = {str(row["id"]) for row in bob_logs}

    def page(before: str) -> httpx.Response:
        return engram.get("/retrieval-logs", pair.alice.user, params={"before": before})

    for bob_id in bob_ids:
        answer = page(bob_id)
        assert answer.status_code in (200, 400, 404), answer.text
        if answer.status_code == 200:
            assert not {entry["id"] for entry in answer.json()["data"]} & bob_ids
            assert pair.bob.user.id not in answer.text
            for memory in BOB_MEMORIES:
                assert memory not in answer.text
        # Another user's id must look exactly like an id that does not exist at all.
        unknown = page(str(uuid.uuid4()))
        assert (answer.status_code, answer.json()) == (unknown.status_code, unknown.json())


async def test_user_id_header_must_name_the_keys_own_user(
    engram: Engram, upstream: FakeOpenAI, pair: Pair
) -> None:
    alice, bob = pair.alice.user, pair.bob.user
    answer = chat(engram, alice, "What is my favourite drink?", **{"X-Engram-User-ID": alice.id})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-engram-memories-injected"] != "0"

    calls_before = len(upstream.received)
    for claimed in (bob.id, str(uuid.uuid4()), "not-a-uuid", f"{alice.id},{bob.id}"):
        refused = chat(
            engram, alice, "What is my favourite drink?", **{"X-Engram-User-ID": claimed}
        )
        assert refused.status_code == 403, (claimed, refused.text)
        error = refused.json()["error"]
        assert error["type"] == "permission_error"
        assert error["message"]
        assert "code" in error
        assert "espresso" not in refused.text
        assert "green tea" not in refused.text
    assert len(upstream.received) == calls_before  # refused before reaching the provider


async def test_user_id_header_guards_the_memories_api_too(
    engram: Engram, db: asyncpg.Connection, pair: Pair
) -> None:
    alice, bob = pair.alice.user, pair.bob.user
    as_bob = {"X-Engram-User-ID": bob.id}

    capture = engram.post(
        "/memories/capture", alice, {"content": "I am now Bob's memory"}, headers=as_bob
    )
    search = engram.post("/memories/search", alice, {"query": "drink"}, headers=as_bob)
    logs = engram.get("/retrieval-logs", alice, headers=as_bob)

    for answer in (capture, search, logs):
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["type"] == "permission_error"
    stored = await db.fetchval(
        "SELECT count(*) FROM memories WHERE content = $1", "I am now Bob's memory"
    )
    assert stored == 0
    own = engram.post(
        "/memories/search", alice, {"query": "drink"}, headers={"X-Engram-User-ID": alice.id}
    )
    assert own.status_code == 200
