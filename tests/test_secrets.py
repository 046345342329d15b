"""Canary secrets sent through every path never reach the logs, the database or an answer.

Each test sends unique canaries (Engram key, provider key, server key, admin key,
cookie, message text), then reads every log line Engram wrote in this session and
every row of every table. Message text may be stored (conversations hold the
exchange) but never logged; keys are neither.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.conftest import Engram, User, eventually
from tests.fakes.openai_server import FakeOpenAI, Scripted

pytestmark = pytest.mark.anyio

SERVER_KEY = f"sk-server-canary-{uuid.uuid4().hex}"
ADMIN_KEY = f"admin-canary-{uuid.uuid4().hex}"
MODEL = "gpt-4o-mini"
REQUEST_LINE = '"event": "request"'


def canary(kind: str) -> str:
    return f"{kind}-canary-{uuid.uuid4().hex}"


def fragments(secret: str) -> list[str]:
    """Two 16-character pieces of the secret's random tail: a truncated leak still shows one."""
    return [secret[-32:-16], secret[-16:]]


@pytest.fixture(scope="module")
def guarded(start_engram: Callable[..., AbstractContextManager[Engram]]) -> Iterator[Engram]:
    """An Engram holding a provider key and an admin key, both canaries."""
    # A small body limit: a 413 body then fits in the socket buffers, so the client reads
    # the answer before Engram hangs up on the rest.
    with start_engram(
        openai_api_key=SERVER_KEY, admin_key=ADMIN_KEY, max_body_bytes=16 * 1024
    ) as running:
        yield running


@pytest.fixture
async def http(guarded: Engram) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url) as client:
        yield client


def new_user(server: Engram) -> User:
    answer = httpx.post(
        f"{server.url}/users",
        json={"email": f"{uuid.uuid4().hex[:12]}@example.com"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    return User(body["userId"], body["apiKey"])


@dataclass
class Secrets:
    """What one test sent, and what it must find afterwards."""

    user: User
    byok: str = field(default_factory=lambda: canary("sk-byok"))
    cookie: str = field(default_factory=lambda: canary("cookie"))
    message: str = field(default_factory=lambda: canary("message"))
    extra: list[str] = field(default_factory=list)
    answers: list[httpx.Response] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """Secrets that may appear nowhere: not in logs, rows or answers."""
        return [self.user.api_key, self.byok, self.cookie, SERVER_KEY, ADMIN_KEY, *self.extra]

    def headers(self, **more: str) -> dict[str, str]:
        return {
            "X-Engram-Key": self.user.api_key,
            "Authorization": f"Bearer {self.byok}",
            "Cookie": f"session={self.cookie}; theme=dark",
            **more,
        }

    def chat_body(self, **fields: Any) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": f"system prompt {self.message}"},
                {"role": "user", "content": f"Please remember {self.message}"},
            ],
            **fields,
        }

    def keep(self, answer: httpx.Response) -> httpx.Response:
        self.answers.append(answer)
        return answer


async def dump_database(db: asyncpg.Connection) -> str:
    """Every row of every table in the public schema, as text."""
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert {"users", "api_keys", "conversations", "retrieval_logs"} <= {
        t["tablename"] for t in tables
    }
    rows: list[str] = []
    for table in tables:
        name = table["tablename"].replace('"', '""')
        rows.extend(r["row"] for r in await db.fetch(f'SELECT t::text AS row FROM "{name}" t'))  # noqa: S608
    return "\n".join(rows)


async def recorded(db: asyncpg.Connection, user: User, conversations: int) -> bool:
    """True once the user's conversations (and their retrieval logs) are written."""
    done: bool = await db.fetchval(
        "SELECT count(*) >= $2 FROM conversations WHERE user_id = $1::uuid",
        user.id,
        conversations,
    )
    return done


async def assert_kept(
    secrets: Secrets,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
    *,
    since: int,
    requests: int,
    conversations: int = 0,
    answers: Iterable[httpx.Response] = (),
) -> None:
    """No key in any log line, row or answer; no message text in any log line."""
    await eventually(lambda: log_stream.getvalue()[since:].count(REQUEST_LINE) >= requests)
    if conversations:
        await eventually(lambda: recorded(db, secrets.user, conversations))
    logs = log_stream.getvalue()
    for line in logs[since:].splitlines():
        json.loads(line)  # every line is JSON, so nothing bypassed the structured logger
    rows = await dump_database(db)
    for secret in secrets.keys:
        for piece in fragments(secret):
            assert piece not in logs, f"a secret was logged: {secret[:12]}…"
            assert piece not in rows, f"a secret was stored: {secret[:12]}…"
    for piece in fragments(secrets.message):
        assert piece not in logs, "message text was logged"
    if conversations:
        assert secrets.message in rows  # the dump does see the stored exchange
    for answer in [*secrets.answers, *answers]:
        text = answer.text + json.dumps(dict(answer.headers))
        for secret in secrets.keys:
            for piece in fragments(secret):
                assert piece not in text, f"a secret was echoed to the client: {secret[:12]}…"


# --- chat ------------------------------------------------------------------------------------


async def test_non_streamed_chat(
    guarded: Engram, upstream: FakeOpenAI, db: asyncpg.Connection, log_stream: io.StringIO
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    with openai.OpenAI(
        base_url=f"{guarded.url}/v1",
        api_key=secrets.byok,
        default_headers={k: v for k, v in secrets.headers().items() if k != "Authorization"},
        max_retries=0,
    ) as client:
        raw = client.chat.completions.with_raw_response.create(**secrets.chat_body())
    secrets.keep(raw.http_response)
    assert raw.http_response.status_code == 200
    assert upstream.last().headers["authorization"] == f"Bearer {secrets.byok}"
    await assert_kept(secrets, db, log_stream, since=since, requests=2, conversations=1)


async def test_streamed_chat(
    guarded: Engram, upstream: FakeOpenAI, db: asyncpg.Connection, log_stream: io.StringIO
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    async with (
        openai.AsyncOpenAI(
            base_url=f"{guarded.url}/v1",
            api_key=secrets.byok,
            default_headers={k: v for k, v in secrets.headers().items() if k != "Authorization"},
            max_retries=0,
        ) as client,
        client.chat.completions.with_streaming_response.create(
            stream=True, stream_options={"include_usage": True}, **secrets.chat_body()
        ) as response,
    ):
        text = "".join(
            [c.choices[0].delta.content or "" async for c in await response.parse() if c.choices]
        )
    assert text.strip() == upstream.reply
    assert upstream.last().headers["authorization"] == f"Bearer {secrets.byok}"
    await assert_kept(secrets, db, log_stream, since=since, requests=2, conversations=1)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_with_an_upstream_error(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
    stream: bool,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    upstream.script(
        Scripted(
            status=401,
            body={"error": {"message": "Incorrect API key provided: sk-by****", "type":
                            "invalid_request_error", "code": "invalid_api_key"}},
        )
    )  # fmt: skip
    answer = secrets.keep(
        await http.post(
            "/v1/chat/completions",
            json=secrets.chat_body(stream=stream),
            headers=secrets.headers(),
        )
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert upstream.last().headers["authorization"] == f"Bearer {secrets.byok}"
    await assert_kept(secrets, db, log_stream, since=since, requests=2, conversations=1)


async def test_engram_key_as_bearer_with_the_servers_provider_key(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    headers = {
        "Authorization": f"Bearer {secrets.user.api_key}",
        "Cookie": f"session={secrets.cookie}",
    }
    for stream in (False, True):
        answer = secrets.keep(
            await http.post(
                "/v1/chat/completions",
                json=secrets.chat_body(stream=stream),
                headers=headers,
            )
        )
        assert answer.status_code == 200, answer.text
        assert upstream.last().headers["authorization"] == f"Bearer {SERVER_KEY}"
    models = secrets.keep(await http.get("/v1/models", headers=headers))
    assert models.status_code == 200
    assert upstream.models_received[-1]["authorization"] == f"Bearer {SERVER_KEY}"
    await assert_kept(secrets, db, log_stream, since=since, requests=4, conversations=2)


async def test_models_with_the_callers_provider_key(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    answer = secrets.keep(await http.get("/v1/models", headers=secrets.headers()))
    assert answer.status_code == 200
    assert upstream.models_received[-1]["authorization"] == f"Bearer {secrets.byok}"
    assert "cookie" not in upstream.models_received[-1]
    await assert_kept(secrets, db, log_stream, since=since, requests=2)


# --- the memories API and administration -----------------------------------------------------


async def test_memories_api(
    guarded: Engram, http: httpx.AsyncClient, db: asyncpg.Connection, log_stream: io.StringIO
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    headers = secrets.headers()
    captured = secrets.keep(
        await http.post(
            "/memories/capture",
            json={"content": f"My locker code is {secrets.message}", "metadata": {"k": "v"}},
            headers=headers,
        )
    )
    assert captured.status_code == 201, captured.text
    found = secrets.keep(
        await http.post(
            "/memories/search",
            json={"query": f"locker code {secrets.message}", "threshold": 0},
            headers=headers,
        )
    )
    assert found.status_code == 200
    assert secrets.message in found.text
    logs = secrets.keep(await http.get("/retrieval-logs", headers=headers))
    assert logs.status_code == 200
    await assert_kept(secrets, db, log_stream, since=since, requests=4)
    assert secrets.message in await dump_database(db)


async def test_creating_users(
    guarded: Engram, http: httpx.AsyncClient, db: asyncpg.Connection, log_stream: io.StringIO
) -> None:
    since = log_stream.tell()
    wrong_admin = canary("admin-wrong")
    created = await http.post(
        "/users",
        json={"email": f"{uuid.uuid4().hex[:12]}@example.com"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert created.status_code == 201
    user = User(created.json()["userId"], created.json()["apiKey"])
    secrets = Secrets(user, extra=[wrong_admin])
    refused = secrets.keep(
        await http.post(
            "/users",
            json={"email": f"{uuid.uuid4().hex[:12]}@example.com"},
            headers={"Authorization": f"Bearer {wrong_admin}", "Cookie": secrets.cookie},
        )
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    await assert_kept(secrets, db, log_stream, since=since, requests=2)


# --- bad requests ----------------------------------------------------------------------------


async def test_bad_requests(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    forged = f"egm_{'0' * 16}_{canary('forged')}"
    junk = canary("junk-key")
    secrets.extra += [forged, junk]
    other = new_user(guarded)
    chat = "/v1/chat/completions"
    malformed = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{secrets.message}'
    )
    too_large = json.dumps(secrets.chat_body(padding="x" * (guarded.settings.max_body_bytes + 1)))

    as_other = secrets.headers(**{"X-Engram-User-ID": other.id})
    cases: list[tuple[int, httpx.Response]] = [
        (400, await http.post(chat, content=malformed, headers=secrets.headers())),
        (400, await http.post(chat, json={"note": secrets.message}, headers=secrets.headers())),
        (400, await http.post(chat, json=secrets.chat_body(messages=[{"role": secrets.message}]),
                              headers=secrets.headers())),
        (400, await http.post("/memories/capture", content=malformed, headers=secrets.headers())),
        (401, await http.post(chat, json=secrets.chat_body(),
                              headers=secrets.headers(**{"X-Engram-Key": forged}))),
        (401, await http.post(chat, json=secrets.chat_body(),
                              headers=secrets.headers(**{"X-Engram-Key": junk}))),
        (401, await http.post(chat, json=secrets.chat_body(),
                              headers={"Authorization": f"Bearer {forged}"})),
        (401, await http.post(chat, json=secrets.chat_body(),
                              headers={"Authorization": f"Bearer {secrets.byok}"})),
        (401, await http.get("/v1/models", headers={"Authorization": f"Bearer {secrets.byok}"})),
        (403, await http.post(chat, json=secrets.chat_body(), headers=as_other)),
        (403, await http.post("/memories/search", json={"query": secrets.message},
                              headers=as_other)),
        (413, await http.post(chat, content=too_large, headers=secrets.headers())),
    ]  # fmt: skip

    for expected, answer in cases:
        secrets.keep(answer)
        assert answer.status_code == expected, (expected, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert error["message"]
        assert error["type"]
    assert upstream.received == []
    await assert_kept(secrets, db, log_stream, since=since, requests=len(cases) + 2)


# --- what reaches the upstream ---------------------------------------------------------------

# What httpx itself sends, plus what the upstream needs: nothing of the client's own.
UPSTREAM_HEADERS = {
    "host", "accept", "accept-encoding", "connection", "user-agent", "content-type",
    "content-length", "authorization", "openai-organization", "openai-project", "openai-beta",
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
async def test_only_the_headers_the_upstream_needs_are_forwarded(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
    stream: bool,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    hop = canary("hop")
    secrets.extra.append(hop)
    headers = secrets.headers(
        **{
            "X-Engram-User-ID": secrets.user.id,
            "X-Engram-Disable-Injection": "false",
            "X-Engram-Disable-Extraction": "false",
            "X-Engram-Provider": "openai",
            "Connection": "keep-alive, X-Hop-Canary",
            "X-Hop-Canary": hop,
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": f"Basic {hop}",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Forwarded": f"for=10.0.0.1;by={hop}",
            "X-Forwarded-For": "10.0.0.1",
            "OpenAI-Organization": "org-canary-ok",
        }
    )
    answer = secrets.keep(
        await http.post(
            "/v1/chat/completions",
            json=secrets.chat_body(stream=stream),
            headers=headers,
        )
    )
    assert answer.status_code == 200, answer.text

    sent = upstream.last().headers
    assert sent["authorization"] == f"Bearer {secrets.byok}"
    assert sent["openai-organization"] == "org-canary-ok"
    assert set(sent) <= UPSTREAM_HEADERS, set(sent) - UPSTREAM_HEADERS
    assert not any(name.startswith("x-engram") for name in sent)
    assert "cookie" not in sent
    assert sent["connection"].lower() == "keep-alive"
    for value in sent.values():
        for secret in (secrets.cookie, hop, secrets.user.api_key):
            assert secret not in value
    await assert_kept(secrets, db, log_stream, since=since, requests=2, conversations=1)


async def test_no_message_text_is_logged_from_any_part_of_a_conversation(
    guarded: Engram,
    http: httpx.AsyncClient,
    upstream: FakeOpenAI,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    since = log_stream.tell()
    secrets = Secrets(new_user(guarded))
    text = secrets.message
    guarded_capture = await http.post(
        "/memories/capture",
        json={"content": f"I always order {text}"},
        headers=secrets.headers(),
    )
    assert guarded_capture.status_code == 201
    body = {
        "model": MODEL,
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": f"dev {text}"}]},
            {"role": "user", "content": f"What do I always order? {text}", "name": "ana"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "lookup", "arguments": json.dumps({"q": text})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": f"result {text}"},
            {"role": "user", "content": [{"type": "text", "text": f"and again {text}"}]},
        ],
        "metadata": {"note": text},
    }  # fmt: skip
    upstream.script(Scripted(content=f"You always order {text}"))
    answer = await http.post("/v1/chat/completions", json=body, headers=secrets.headers())
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-engram-memories-injected"] == "1"
    assert text in upstream.last().system_text
    await assert_kept(secrets, db, log_stream, since=since, requests=3, conversations=1)
