"""End to end through the official openai SDK: memories reach the upstream prompt."""

from __future__ import annotations

import base64
import json
import os

import asyncpg
import pytest

from proxy.injection import BLOCK_START
from tests.conftest import Engram, eventually
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.anyio


async def test_captured_memory_is_injected_and_headers_say_so(
    engram: Engram, upstream: FakeOpenAI
) -> None:
    user = engram.create_user()
    captured = engram.capture(user, "I prefer espresso over drip")
    assert captured["status"] == "stored"

    with engram.client(user) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "You are a barista."},
                {"role": "user", "content": "What coffee should I order?"},
            ],
        )
    completion = raw.parse()

    assert completion.choices[0].message.content == upstream.reply
    assert raw.headers["x-engram-memories-injected"] == "1"
    assert raw.headers["x-engram-mode"] == "full"
    assert raw.headers["x-engram-retrieval-id"]
    sent = upstream.last()
    assert [m["role"] for m in sent.messages] == ["system", "system", "user"]
    assert sent.messages[0]["content"] == "You are a barista."
    assert sent.messages[1]["content"].startswith(BLOCK_START)
    assert "I prefer espresso over drip" in sent.messages[1]["content"]
    assert sent.headers["authorization"] == "Bearer sk-test-provider-key"
    assert not any(name.startswith("x-engram") for name in sent.headers)


async def test_streamed_answer_is_relayed_and_recorded(
    engram: Engram, upstream: FakeOpenAI, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    engram.capture(user, "My daughter is called Ana")
    async with (
        engram.async_client(user) as client,
        client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "What is my daughter's name?"}],
            stream=True,
        ) as response,
    ):
        assert response.headers["x-engram-memories-injected"] == "1"
        text = ""
        async for chunk in await response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text.strip() == upstream.reply

    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM conversations WHERE user_id = $1::uuid", user.id)
    )
    # Queued for extraction (the inline worker may already have finished it).
    assert row["extraction_status"] in {"pending", "done"}
    assert await db.fetchval(
        "SELECT count(*) FROM memory_jobs WHERE conversation_id = $1", row["id"]
    )
    assert '"content": "Hello from the fake upstream. "' in row["reply"]


async def test_a_photo_sent_inline_reaches_the_provider_and_is_not_stored(
    engram: Engram, upstream: FakeOpenAI, db: asyncpg.Connection
) -> None:
    """A phone photo in base64 (4 MB) passes the default body limit; the row keeps its size."""
    user = engram.create_user()
    photo = "data:image/jpeg;base64," + base64.b64encode(os.urandom(3_000_000)).decode()
    with engram.client(user) as client:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What bird is this?"},
                        {"type": "image_url", "image_url": {"url": photo, "detail": "high"}},
                    ],
                }
            ],
        )
    sent = upstream.last().messages[-1]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": photo, "detail": "high"}}

    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM conversations WHERE user_id = $1::uuid", user.id)
    )
    stored = json.loads(row["messages"])[-1]["content"]
    assert stored == [
        {"type": "text", "text": "What bird is this?"},
        {
            "type": "image_url",
            "image_url": {
                "url": "data:image/jpeg;base64,<4,000,000 characters not stored>",
                "detail": "high",
            },
        },
    ]
