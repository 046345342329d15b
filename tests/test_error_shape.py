"""Every error of Engram's HTTP API, in the one OpenAI shape and with its status.

    {"error": {"message": str, "type": str, "code": str | None, "param": str | None}}

proxy/errors.py is the one place that makes these answers; this file pins the
shape for each error path, as datasette's tests/test_error_shape.py does for its
API. Every check also asserts that no key sent with the request (Engram key,
its secret, provider key, admin key) comes back in the answer.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from starlette.responses import JSONResponse

from tests.conftest import ADMIN_KEY, PROVIDER_KEY, Engram, User
from tests.fakes.openai_server import FakeOpenAI, Scripted
from tests.fakes.serving import serve_in_thread

StartEngram = Callable[..., AbstractContextManager[Engram]]

ERROR_FIELDS = {"message", "type", "code", "param"}
HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HI}
LIMIT = 4096  # ENGRAM_MAX_BODY_BYTES of the `strict` Engram
MiB = 1024 * 1024


# Helpers: the shape, and the secrets that must never come back


def sent_secrets(headers: Mapping[str, str]) -> list[str]:
    """The keys a request carried: whole, and an Engram key's secret part alone."""
    found = []
    for name in ("x-engram-key", "authorization"):
        value = headers.get(name, "").strip()
        token = value.split()[-1] if value else ""
        found += [value, token]
        if token.startswith("egm_"):
            found.append(token.split("_", 2)[-1])
    return [secret for secret in found if len(secret) >= 8]


def assert_no_secrets(text: str, request_headers: Mapping[str, str]) -> None:
    for secret in {*sent_secrets(request_headers), PROVIDER_KEY, ADMIN_KEY}:
        assert secret not in text, "an error answer repeats a key sent with the request"


def assert_error(
    response: httpx.Response,
    status: int,
    error_type: str,
    code: str | None,
    param: str | None = None,
) -> str:
    """`response` is `status` with exactly the OpenAI error shape; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == ERROR_FIELDS
    assert (error["type"], error["code"], error["param"]) == (error_type, code, param)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert_no_secrets(response.text, response.request.headers)
    message: str = error["message"]
    return message


def assert_sdk_error(
    error: openai.APIStatusError,
    status: int,
    error_type: str,
    code: str | None,
    param: str | None = None,
) -> str:
    """The same checks, on what the official SDK raised."""
    assert error.status_code == status
    assert isinstance(error.body, dict)
    assert set(error.body) == ERROR_FIELDS
    assert (error.type, error.code, error.param) == (error_type, code, param)
    assert list(error.response.json()) == ["error"]
    assert_no_secrets(error.response.text, error.response.request.headers)
    message: str = error.body["message"]
    return message


def sdk_client(engram: Engram, engram_key: str | None, **headers: str) -> openai.OpenAI:
    """The official SDK as an application uses it, with `engram_key` in X-Engram-Key."""
    if engram_key is not None:
        headers["X-Engram-Key"] = engram_key
    return openai.OpenAI(
        base_url=f"{engram.url}/v1", api_key=PROVIDER_KEY, default_headers=headers, max_retries=0
    )


def keyed(user: User) -> dict[str, str]:
    return {"X-Engram-Key": user.api_key, "Authorization": f"Bearer {PROVIDER_KEY}"}


def sse_events(text: str) -> list[str]:
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]


@pytest.fixture(scope="module")
def user(engram: Engram) -> User:
    return engram.create_user()


@pytest.fixture(scope="module")
def strict(start_engram: StartEngram) -> Iterator[Engram]:
    """An Engram with small limits: 4 KiB bodies, 3 messages."""
    with start_engram(max_body_bytes=LIMIT, max_messages=3) as running:
        yield running


@pytest.fixture(scope="module")
def strict_user(strict: Engram) -> User:
    return strict.create_user()


# 400: the chat body, field by field (through the official SDK)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"messages": openai.omit}, "messages", id="messages-missing"),
        pytest.param({"messages": []}, "messages", id="messages-empty"),
        pytest.param({"messages": None}, "messages", id="messages-null"),
        pytest.param({"messages": "hi"}, "messages", id="messages-a-string"),
        pytest.param({"messages": {"role": "user"}}, "messages", id="messages-an-object"),
        pytest.param({"messages": ["hi"]}, "messages[0]", id="message-a-string"),
        pytest.param({"messages": [*HI, None]}, "messages[1]", id="second-message-null"),
        pytest.param(
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages[0].role",
            id="role-unknown",
        ),
        pytest.param({"messages": [{"content": "hi"}]}, "messages[0].role", id="role-missing"),
        pytest.param(
            {"messages": [{"role": "user", "content": 42}]},
            "messages[0].content",
            id="content-a-number",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": {"text": "hi"}}]},
            "messages[0].content",
            id="content-an-object",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": ["hi"]}]},
            "messages[0].content",
            id="content-part-a-string",
        ),
        pytest.param({"model": openai.omit}, "model", id="model-missing"),
        pytest.param({"model": ""}, "model", id="model-empty"),
        pytest.param({"model": "   "}, "model", id="model-blank"),
        pytest.param({"model": 4}, "model", id="model-a-number"),
        pytest.param({"stream": "yes"}, "stream", id="stream-a-string"),
        pytest.param({"stream": 1}, "stream", id="stream-a-number"),
    ],
)
def test_chat_field_errors_are_400_naming_the_field(
    engram: Engram, user: User, upstream: FakeOpenAI, fields: dict[str, Any], param: str
) -> None:
    with (
        sdk_client(engram, user.api_key) as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.chat.completions.create(**{**CHAT, **fields})
    message = assert_sdk_error(caught.value, 400, "invalid_request_error", "invalid_value", param)
    assert message.startswith(f"{param}: ")
    assert upstream.received == []


def test_too_many_messages_is_400(strict: Engram, strict_user: User) -> None:
    with sdk_client(strict, strict_user.api_key) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI * 3)  # at the limit
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=HI * 4)
    message = assert_sdk_error(
        caught.value, 400, "invalid_request_error", "invalid_value", "messages"
    )
    assert "limit of 3 messages" in message


@pytest.mark.parametrize("header", ["X-Engram-Disable-Injection", "X-Engram-Disable-Extraction"])
def test_option_header_that_is_not_a_boolean_is_400(
    engram: Engram, user: User, upstream: FakeOpenAI, header: str
) -> None:
    client = sdk_client(engram, user.api_key, **{header: "maybe"})
    with client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**CHAT)
    message = assert_sdk_error(
        caught.value, 400, "invalid_request_error", "invalid_header", header.lower()
    )
    assert header.lower() in message
    assert upstream.received == []


# 400: bodies that are not a JSON object, on every endpoint that reads one

NOT_JSON = "request body is not valid JSON"
NOT_AN_OBJECT = "request body must be a JSON object"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        pytest.param(b'{"model": "gpt-4o-mini", "messages": [', NOT_JSON, id="truncated"),
        pytest.param(b"", NOT_JSON, id="empty"),
        pytest.param(b"\xff\xfe{}", NOT_JSON, id="not-utf8"),
        pytest.param(b"[" * 100_000, NOT_JSON, id="nested-too-deep"),
        pytest.param(b'{"content": "x", "metadata": {"n": NaN}}', NOT_JSON, id="NaN"),
        pytest.param(b'{"content": "x", "metadata": {"n": -Infinity}}', NOT_JSON, id="Infinity"),
        pytest.param(b'{"content": "x", "metadata": {"n": 1e400}}', NOT_JSON, id="float-overflow"),
        pytest.param(b'{"content": "a\\ud800b", "query": "a\\udfffb"}', NOT_JSON, id="surrogate"),
        pytest.param(b'[{"role": "user", "content": "hi"}]', NOT_AN_OBJECT, id="an-array"),
        pytest.param(b'"hello"', NOT_AN_OBJECT, id="a-string"),
        pytest.param(b"null", NOT_AN_OBJECT, id="null"),
    ],
)
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/chat", "/memories/capture", "/memories/search", "/users"]
)
def test_body_that_is_not_a_json_object_is_400(
    engram: Engram, user: User, upstream: FakeOpenAI, path: str, raw: bytes, says: str
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if path == "/users" else keyed(user)
    response = httpx.post(
        f"{engram.url}{path}",
        content=raw,
        headers={**headers, "Content-Type": "application/json"},
    )
    assert assert_error(response, 400, "invalid_request_error", "invalid_json").startswith(says)
    assert upstream.received == []


def test_emoji_escapes_are_not_mistaken_for_lone_surrogates(engram: Engram, user: User) -> None:
    raw = b'{"content": "likes \\ud83d\\ude00 emoji", "metadata": {"s": "\\\\ud800"}}'
    response = httpx.post(f"{engram.url}/memories/capture", content=raw, headers=keyed(user))
    assert response.status_code == 201, response.text


# 413: bodies over ENGRAM_MAX_BODY_BYTES


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/memories/capture", "/users", "/nope"])
def test_body_over_the_limit_by_content_length_is_413(
    strict: Engram, strict_user: User, upstream: FakeOpenAI, path: str
) -> None:
    body = {**CHAT, "content": "x" * LIMIT}
    response = httpx.post(f"{strict.url}{path}", json=body, headers=keyed(strict_user))
    assert int(response.request.headers["content-length"]) > LIMIT
    message = assert_error(response, 413, "request_too_large", "request_too_large")
    assert str(LIMIT) in message
    assert response.headers["connection"] == "close"
    assert upstream.received == []


def test_body_just_under_the_limit_is_served(strict: Engram, strict_user: User) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * (LIMIT - 200)}]}
    response = httpx.post(
        f"{strict.url}/v1/chat/completions", json=body, headers=keyed(strict_user)
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/memories/capture"])
def test_chunked_body_over_the_limit_is_413_before_it_is_all_sent(
    strict: Engram, strict_user: User, upstream: FakeOpenAI, path: str
) -> None:
    offered = 256 * MiB
    pulled = 0

    def body() -> Iterator[bytes]:  # a generator: httpx sends it chunked, with no length
        nonlocal pulled
        yield b'{"model": "gpt-4o-mini", "content": "'
        piece = b"x" * (64 * 1024)
        while pulled < offered:
            pulled += len(piece)
            yield piece

    response = httpx.post(
        f"{strict.url}{path}", content=body(), headers=keyed(strict_user), timeout=60
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert str(LIMIT) in assert_error(response, 413, "request_too_large", "request_too_large")
    # Engram answered and hung up while the client was still sending: the body was
    # neither buffered nor drained (socket buffers hold a few MiB at most).
    assert response.headers["connection"] == "close"
    assert pulled < 32 * MiB, f"the client got to send {pulled // MiB} MiB of a 4 KiB limit"
    assert upstream.received == []


# 401: who is calling


def _wrong_secret(user: User) -> str:
    key_id = user.api_key.split("_")[1]
    return f"egm_{key_id}_{'A' * 43}"


KEYS: list[Any] = [
    pytest.param(lambda user: None, "missing_api_key", id="no-engram-key"),
    pytest.param(lambda user: "not-an-engram-key", "invalid_api_key", id="malformed"),
    pytest.param(lambda user: "egm_XYZ_secretsecret", "invalid_api_key", id="malformed-key-id"),
    pytest.param(lambda user: "egm_0123456789abcdef_xxx", "invalid_api_key", id="unknown-key-id"),
    pytest.param(_wrong_secret, "invalid_api_key", id="wrong-secret"),
    pytest.param(lambda user: user.api_key + "x", "invalid_api_key", id="secret-one-char-longer"),
]


@pytest.mark.parametrize(("make_key", "code"), KEYS)
def test_bad_engram_key_is_401(
    engram: Engram,
    user: User,
    upstream: FakeOpenAI,
    make_key: Callable[[User], str | None],
    code: str,
) -> None:
    with (
        sdk_client(engram, make_key(user)) as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.chat.completions.create(**CHAT)
    assert_sdk_error(caught.value, 401, "authentication_error", code)
    assert upstream.received == []


@pytest.mark.parametrize(
    "make_key", [lambda user: "egm_0123456789abcdef_xxx", _wrong_secret], ids=["unknown", "wrong"]
)
def test_bad_engram_key_as_bearer_is_401(
    engram: Engram, user: User, make_key: Callable[[User], str]
) -> None:
    client = openai.OpenAI(base_url=f"{engram.url}/v1", api_key=make_key(user), max_retries=0)
    with client, pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(**CHAT)
    assert_sdk_error(caught.value, 401, "authentication_error", "invalid_api_key")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat"),
        ("GET", "/v1/models"),
        ("POST", "/memories/capture"),
        ("POST", "/memories/search"),
        ("GET", "/retrieval-logs"),
    ],
)
def test_every_user_endpoint_without_any_key_is_401(engram: Engram, method: str, path: str) -> None:
    body = {**CHAT, "content": "c", "query": "q"} if method == "POST" else None
    response = httpx.request(method, f"{engram.url}{path}", json=body)
    assert "authorization" not in response.request.headers
    message = assert_error(response, 401, "authentication_error", "missing_api_key")
    assert "X-Engram-Key" in message


@pytest.mark.anyio
async def test_revoked_key_is_401(engram: Engram, db: asyncpg.Connection) -> None:
    user = engram.create_user()
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1::uuid", user.id)
    async with engram.async_client(user) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(**CHAT)
    assert_sdk_error(caught.value, 401, "authentication_error", "revoked_api_key")


# 403: one key cannot act for another user


def test_user_header_naming_another_user_is_403(
    engram: Engram, user: User, upstream: FakeOpenAI
) -> None:
    other = engram.create_user()
    client = sdk_client(engram, user.api_key, **{"X-Engram-User-ID": other.id})
    with client, pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(**CHAT)
    message = assert_sdk_error(caught.value, 403, "permission_error", "user_mismatch")
    assert "X-Engram-User-ID" in message
    assert other.id not in message
    assert upstream.received == []

    headers = {**keyed(user), "X-Engram-User-ID": "someone-else"}
    response = httpx.post(f"{engram.url}/memories/search", json={"query": "q"}, headers=headers)
    assert_error(response, 403, "permission_error", "user_mismatch")


# 404 and 405: routes


@pytest.mark.parametrize(
    ("method", "path", "status", "error_type", "code"),
    [
        ("GET", "/nope", 404, "not_found_error", "not_found"),
        ("POST", "/v1/completions", 404, "not_found_error", "not_found"),
        ("GET", "/v1/chat/completions", 405, "invalid_request_error", "method_not_allowed"),
        ("DELETE", "/users", 405, "invalid_request_error", "method_not_allowed"),
        ("PUT", "/memories/capture", 405, "invalid_request_error", "method_not_allowed"),
        ("POST", "/retrieval-logs", 405, "invalid_request_error", "method_not_allowed"),
    ],
)
def test_unknown_route_and_wrong_method(
    engram: Engram, user: User, method: str, path: str, status: int, error_type: str, code: str
) -> None:
    response = httpx.request(method, f"{engram.url}{path}", headers=keyed(user))
    assert_error(response, status, error_type, code)
    if status == 405:
        assert response.headers["allow"]


def test_unknown_route_through_the_sdk_is_404(engram: Engram, user: User) -> None:
    with sdk_client(engram, user.api_key) as client, pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert_sdk_error(caught.value, 404, "not_found_error", "not_found")


# 502 and 504: the provider cannot be reached, or does not answer in time


@pytest.fixture(scope="module")
def unreachable(start_engram: StartEngram) -> Iterator[Engram]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
        port = sock.getsockname()[1]
        with start_engram(openai_base_url=f"http://127.0.0.1:{port}/v1") as running:
            yield running


@pytest.fixture(scope="module")
def stalling(start_engram: StartEngram) -> Iterator[Engram]:
    """An Engram with a 0.2 s read timeout, in front of an upstream that waits 1 s."""
    slow = FakeOpenAI(first_token_delay=1.0)
    with (
        serve_in_thread(slow.app) as slow_url,
        start_engram(openai_base_url=f"{slow_url}/v1", upstream_read_timeout=0.2) as running,
    ):
        yield running


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_unreachable_provider_is_502_naming_provider_and_host(
    unreachable: Engram, stream: bool
) -> None:
    user = unreachable.create_user()
    client = sdk_client(unreachable, user.api_key)
    with client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(**CHAT, stream=stream)
    message = assert_sdk_error(caught.value, 502, "upstream_error", "upstream_unreachable")
    assert "openai" in message
    assert "127.0.0.1" in message


def test_unreachable_provider_model_list_is_502(unreachable: Engram) -> None:
    user = unreachable.create_user()
    response = httpx.get(f"{unreachable.url}/v1/models", headers=keyed(user))
    message = assert_error(response, 502, "upstream_error", "upstream_unreachable")
    assert "openai" in message
    assert "127.0.0.1" in message


def test_provider_timeout_is_504(stalling: Engram) -> None:
    user = stalling.create_user()
    started = time.monotonic()
    with (
        sdk_client(stalling, user.api_key) as client,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        client.chat.completions.create(**CHAT)
    message = assert_sdk_error(caught.value, 504, "timeout_error", "upstream_timeout")
    assert "openai" in message
    assert "127.0.0.1" in message
    assert time.monotonic() - started < 5.0


# Provider errors: relayed with their status, body and Retry-After unchanged

PROVIDER_ERRORS = [
    pytest.param(
        400,
        openai.BadRequestError,
        {
            "error": {
                "message": "Invalid value for 'temperature': must be at most 2.",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "decimal_above_max_value",
            }
        },
        id="400",
    ),
    pytest.param(
        401,
        openai.AuthenticationError,
        {
            "error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
        id="401",
    ),
    pytest.param(
        429,
        openai.RateLimitError,
        {
            "error": {
                "message": "Rate limit reached for requests.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            },
            "provider_extra": {"kept": ["as", "sent"]},
        },
        id="429",
    ),
    pytest.param(
        503,
        openai.InternalServerError,
        {"error": {"message": "The engine is overloaded.", "type": "server_error"}},
        id="503",
    ),
]


@pytest.mark.parametrize(("status", "error_class", "body"), PROVIDER_ERRORS)
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_provider_error_keeps_status_body_and_retry_after(
    engram: Engram,
    user: User,
    upstream: FakeOpenAI,
    status: int,
    error_class: type[openai.APIStatusError],
    body: dict[str, Any],
    stream: bool,
) -> None:
    upstream.script(Scripted(status=status, body=body, headers={"Retry-After": "7"}))
    with sdk_client(engram, user.api_key) as client, pytest.raises(error_class) as caught:
        client.chat.completions.create(**CHAT, stream=stream)
    error = caught.value
    assert error.status_code == status
    assert error.response.content == JSONResponse(body).body  # byte for byte as the fake sent it
    assert error.body == body["error"]
    assert error.response.headers["retry-after"] == "7"
    assert_no_secrets(error.response.text, error.response.request.headers)
    assert len(upstream.received) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_provider_error_that_is_not_json_is_relayed_unchanged_and_not_called_json(
    engram: Engram, user: User, upstream: FakeOpenAI, stream: bool
) -> None:
    page = b"<html><body>502 Bad Gateway</body></html>"
    upstream.script(Scripted(status=502, raw=page, headers={"Retry-After": "3"}))
    client = sdk_client(engram, user.api_key)
    with client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(**CHAT, stream=stream)
    error = caught.value
    assert error.status_code == 502
    assert error.response.content == page
    assert error.body == page.decode()
    assert not error.response.headers["content-type"].startswith("application/json")
    assert error.response.headers["retry-after"] == "3"


# After the first streamed byte: an SSE error event, never a second status line


def test_upstream_breaking_mid_stream_ends_with_an_sse_error_event(
    engram: Engram, user: User, upstream: FakeOpenAI
) -> None:
    upstream.script(Scripted(content="one two three", fail_mid_stream=True))
    chunks: list[ChatCompletionChunk] = []
    with sdk_client(engram, user.api_key) as client:
        stream = client.chat.completions.create(**CHAT, stream=True)
        with pytest.raises(openai.APIError) as caught:
            chunks.extend(stream)  # keeps the chunks that came before the error
    assert stream.response.status_code == 200
    assert [c.choices[0].delta.content for c in chunks] == ["", "one "]
    error = caught.value
    assert not isinstance(error, openai.APIStatusError)
    assert isinstance(error.body, dict)
    assert set(error.body) == ERROR_FIELDS
    assert (error.type, error.code) == ("upstream_error", "upstream_unreachable")
    assert "openai" in error.message


@pytest.mark.parametrize(
    ("engram_fixture", "script", "code", "before_error"),
    [
        pytest.param(
            "engram", Scripted(fail_mid_stream=True), "upstream_unreachable", 2, id="break"
        ),
        pytest.param("stalling", None, "upstream_timeout", 0, id="stall"),
    ],
)
def test_streamed_error_event_raw(
    request: pytest.FixtureRequest,
    upstream: FakeOpenAI,
    engram_fixture: str,
    script: Scripted | None,
    code: str,
    before_error: int,
) -> None:
    running: Engram = request.getfixturevalue(engram_fixture)
    if script is not None:
        upstream.script(script)
    user = running.create_user()
    response = httpx.post(
        f"{running.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=keyed(user),
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert "[DONE]" not in events
    assert len(events) == before_error + 1, events
    assert all('"chat.completion.chunk"' in event for event in events[:-1])
    error = json.loads(events[-1])
    assert list(error) == ["error"]
    assert set(error["error"]) == ERROR_FIELDS
    assert error["error"]["code"] == code
    assert "openai" in error["error"]["message"]
    assert_no_secrets(response.text, response.request.headers)


# 400: the memories API and the retrieval logs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({}, "content", id="content-missing"),
        pytest.param({"content": ""}, "content", id="content-empty"),
        pytest.param({"content": "  \n "}, "content", id="content-blank"),
        pytest.param({"content": 42}, "content", id="content-a-number"),
        pytest.param({"content": ["a"]}, "content", id="content-a-list"),
        pytest.param({"content": "x" * 8001}, "content", id="content-too-long"),
        pytest.param({"content": "a\x00b"}, "content", id="content-with-NUL"),
        pytest.param({"content": "ok", "metadata": "tag"}, "metadata", id="metadata-a-string"),
        pytest.param({"content": "ok", "metadata": ["tag"]}, "metadata", id="metadata-a-list"),
        pytest.param(
            {"content": "ok", "metadata": {"a": [{"b": "c\x00"}]}}, "metadata", id="metadata-NUL"
        ),
        pytest.param(
            {"content": "ok", "metadata": {"k\x00": 1}}, "metadata", id="metadata-key-NUL"
        ),
        pytest.param({"content": "ok", "occurred_at": "yesterday"}, "occurred_at", id="date-words"),
        pytest.param(
            {"content": "ok", "occurred_at": "2024-13-01T00:00:00Z"},
            "occurred_at",
            id="date-month-13",
        ),
        pytest.param({"content": "ok", "occurred_at": 1700000000}, "occurred_at", id="date-number"),
        pytest.param(
            {"content": "ok", "occurred_at": "0001-01-01T00:00:00+14:00"},
            "occurred_at",
            id="date-before-year-1-in-utc",
        ),
        pytest.param(
            {"content": "ok", "occurred_at": "9999-12-31T23:59:59-05:00"},
            "occurred_at",
            id="date-after-year-9999-in-utc",
        ),
    ],
)
def test_capture_field_errors_are_400_naming_the_field(
    engram: Engram, user: User, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{engram.url}/memories/capture", json=body, headers=keyed(user))
    message = assert_error(response, 400, "invalid_request_error", "invalid_value", param)
    assert message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({}, "query", id="query-missing"),
        pytest.param({"query": ""}, "query", id="query-empty"),
        pytest.param({"query": 7}, "query", id="query-a-number"),
        pytest.param({"query": "x" * 4001}, "query", id="query-too-long"),
        pytest.param({"query": "q", "limit": 0}, "limit", id="limit-0"),
        pytest.param({"query": "q", "limit": 101}, "limit", id="limit-101"),
        pytest.param({"query": "q", "limit": -1}, "limit", id="limit-negative"),
        pytest.param({"query": "q", "limit": 2.5}, "limit", id="limit-fraction"),
        pytest.param({"query": "q", "limit": "5"}, "limit", id="limit-a-string"),
        pytest.param({"query": "q", "limit": True}, "limit", id="limit-a-boolean"),
        pytest.param({"query": "q", "threshold": 1.5}, "threshold", id="threshold-above-1"),
        pytest.param({"query": "q", "threshold": -1.01}, "threshold", id="threshold-below--1"),
        pytest.param({"query": "q", "threshold": "high"}, "threshold", id="threshold-a-string"),
    ],
)
def test_search_field_errors_are_400_naming_the_field(
    engram: Engram, user: User, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{engram.url}/memories/search", json=body, headers=keyed(user))
    message = assert_error(response, 400, "invalid_request_error", "invalid_value", param)
    assert message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("abc", "limit"),
        ("0", "limit"),
        ("101", "limit"),
        ("-1", "limit"),
        ("1.5", "limit"),
        ("\u00b2", "limit"),  # a digit to str.isdigit(), not to int()
        ("9" * 5000, "limit"),  # past int()'s digit limit
    ],
    ids=["letters", "zero", "101", "negative", "fraction", "superscript-two", "5000-digits"],
)
def test_retrieval_logs_bad_limit_is_400(
    engram: Engram, user: User, query: str, param: str
) -> None:
    response = httpx.get(
        f"{engram.url}/retrieval-logs", params={"limit": query}, headers=keyed(user)
    )
    message = assert_error(response, 400, "invalid_request_error", "invalid_value", param)
    assert message.startswith(f"{param}: ")


@pytest.mark.parametrize("before", ["not-a-uuid", "123", "0" * 33])
def test_retrieval_logs_bad_before_is_400(engram: Engram, user: User, before: str) -> None:
    response = httpx.get(
        f"{engram.url}/retrieval-logs", params={"before": before}, headers=keyed(user)
    )
    message = assert_error(response, 400, "invalid_request_error", "invalid_value", "before")
    assert message.startswith("before: ")


# POST /users: the admin API


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-admin-key-000", f"Basic {ADMIN_KEY}", f"Bearer {ADMIN_KEY}x", "Bearer"],
    ids=["none", "wrong", "basic-scheme", "one-char-longer", "empty-bearer"],
)
def test_create_user_without_the_admin_key_is_401(
    engram: Engram, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(f"{engram.url}/users", json={"email": "a@example.com"}, headers=headers)
    assert_error(response, 401, "authentication_error", "invalid_api_key")


def test_create_user_with_admin_disabled_is_404(start_engram: StartEngram) -> None:
    with start_engram(admin_key=None) as running:
        for headers in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {}):
            response = httpx.post(
                f"{running.url}/users", json={"email": "b@example.com"}, headers=headers
            )
            assert "ENGRAM_ADMIN_KEY" in assert_error(response, 404, "not_found_error", "not_found")


def test_create_user_with_a_taken_email_is_409(engram: Engram) -> None:
    email = f"taken-{time.monotonic_ns()}@example.com"
    engram.create_user(email)
    response = httpx.post(
        f"{engram.url}/users",
        json={"email": email},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    message = assert_error(response, 409, "invalid_request_error", "conflict", "email")
    assert email in message


@pytest.mark.parametrize(
    "body",
    [{}, {"email": ""}, {"email": 42}, {"email": "not-an-email"}, {"email": "a\x00@example.com"}],
    ids=["missing", "empty", "a-number", "no-at-sign", "NUL"],
)
def test_create_user_with_a_bad_email_is_400(engram: Engram, body: dict[str, Any]) -> None:
    response = httpx.post(
        f"{engram.url}/users", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    message = assert_error(response, 400, "invalid_request_error", "invalid_value", "email")
    assert message.startswith("email: ")
