"""The evidence writer: many exchanges in one transaction, none written or counted twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path
from uuid import UUID

import asyncpg
import numpy as np
import pytest

from proxy.db.evidence import (
    ConversationRecord,
    Exchange,
    RetrievalRecord,
    record_exchanges,
    without_inline_files,
)
from proxy.db.pool import Pool
from proxy.health import DatabaseHealth
from proxy.journal import Journal
from proxy.recorder import EvidenceRecorder

pytestmark = pytest.mark.anyio


async def new_user_with_memories(db: asyncpg.Connection, count: int) -> tuple[UUID, list[UUID]]:
    user_id: UUID = await db.fetchval(
        "INSERT INTO users (email) VALUES ($1) RETURNING id", f"{uuid.uuid4()}@example.com"
    )
    memory_ids = [
        await db.fetchval(
            """
            INSERT INTO memories (user_id, content, content_hash, embedding)
            VALUES ($1, $2, $3, $4::text::vector) RETURNING id
            """,
            user_id,
            f"memory {n}",
            f"hash {n}",
            str(np.eye(384)[n].tolist()),
        )
        for n in range(count)
    ]
    return user_id, memory_ids


def exchange(
    user_id: UUID, used: list[UUID], *, extract: bool = True, answered: bool = True
) -> Exchange:
    conversation_id = uuid.uuid4()
    return Exchange(
        ConversationRecord(
            id=conversation_id,
            user_id=user_id,
            provider="openai",
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi \x00 there"}],
            reply={"role": "assistant", "content": "hello"} if answered else None,
            status_code=200,
            extraction_status="pending" if extract else "skipped",
        ),
        RetrievalRecord(
            id=uuid.uuid4(),
            user_id=user_id,
            conversation_id=conversation_id,
            query_text="hi there",
            query_embedding=np.eye(384, dtype=np.float32)[0],
            memory_ids=used,
            scores=[0.5] * len(used),
        ),
    )


async def access_counts(db: asyncpg.Connection, memory_ids: list[UUID]) -> list[int]:
    rows = await db.fetch(
        "SELECT id, access_count FROM memories WHERE id = ANY($1::uuid[])", memory_ids
    )
    by_id = {row["id"]: row["access_count"] for row in rows}
    return [by_id[memory_id] for memory_id in memory_ids]


async def test_a_batch_writes_every_row_and_counts_each_use(
    pool: Pool, db: asyncpg.Connection
) -> None:
    alice, (a1, a2) = await new_user_with_memories(db, 2)
    bob, (b1,) = await new_user_with_memories(db, 1)
    batch = [
        exchange(alice, [a1, a2]),
        exchange(alice, [a1], extract=False),
        exchange(bob, [b1], answered=False),
    ]
    await record_exchanges(pool, batch)

    ids = [e.conversation.id for e in batch]
    stored = await db.fetch(
        "SELECT id, user_id, messages, reply FROM conversations WHERE id = ANY($1::uuid[])", ids
    )
    assert {row["id"]: row["user_id"] for row in stored} == {
        ids[0]: alice,
        ids[1]: alice,
        ids[2]: bob,
    }
    assert all("\x00" not in row["messages"] for row in stored)
    replies = {row["id"]: row["reply"] for row in stored}
    assert replies[ids[0]] is not None
    assert replies[ids[2]] is None  # SQL NULL, not the JSON null
    logs = await db.fetchval(
        "SELECT count(*) FROM retrieval_logs WHERE conversation_id = ANY($1::uuid[])", ids
    )
    jobs = await db.fetch(
        "SELECT conversation_id FROM memory_jobs WHERE conversation_id = ANY($1::uuid[])", ids
    )
    assert logs == 3
    assert {row["conversation_id"] for row in jobs} == {ids[0], ids[2]}  # not the skipped one
    assert await access_counts(db, [a1, a2, b1]) == [2, 1, 1]


async def test_a_written_exchange_written_again_changes_nothing(
    pool: Pool, db: asyncpg.Connection
) -> None:
    user, (memory,) = await new_user_with_memories(db, 1)
    first, second = exchange(user, [memory]), exchange(user, [memory])
    await record_exchanges(pool, [first])
    await record_exchanges(pool, [first, second])  # a replay carrying one new exchange

    ids = [first.conversation.id, second.conversation.id]
    logs = await db.fetchval(
        "SELECT count(*) FROM retrieval_logs WHERE conversation_id = ANY($1::uuid[])", ids
    )
    assert logs == 2
    assert await access_counts(db, [memory]) == [2]


async def test_one_refused_exchange_does_not_keep_the_others_out(
    pool: Pool, db: asyncpg.Connection, tmp_path: Path
) -> None:
    user, (memory,) = await new_user_with_memories(db, 1)
    deleted_user = uuid.uuid4()  # no such user: its rows break a foreign key
    batch = [exchange(user, [memory]), exchange(deleted_user, []), exchange(user, [memory])]

    health = DatabaseHealth(lambda: pool.fetchval("SELECT 1"))
    recorder = EvidenceRecorder(
        lambda exchanges: record_exchanges(pool, exchanges),
        Journal(tmp_path / "journal", max_bytes=1 << 20),
        health,
    )
    for item in batch:  # queued before the writer runs, so they go as one batch
        recorder.submit(item)
    recorder.start()
    await recorder.close(grace_seconds=10)

    written = await db.fetchval(
        "SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])",
        [e.conversation.id for e in batch],
    )
    assert written == 2
    assert await access_counts(db, [memory]) == [2]
    assert health.up  # refused is not an outage
    assert not (tmp_path / "journal" / "exchanges.jsonl").exists()


async def test_exchanges_that_come_together_are_written_in_one_transaction(
    pool: Pool, db: asyncpg.Connection, tmp_path: Path
) -> None:
    user, (memory,) = await new_user_with_memories(db, 1)
    first, second = exchange(user, [memory]), exchange(user, [memory])
    batches: list[int] = []

    async def write(exchanges: Sequence[Exchange]) -> None:
        batches.append(len(exchanges))
        await record_exchanges(pool, exchanges)

    recorder = EvidenceRecorder(
        write,
        Journal(tmp_path / "journal", max_bytes=1 << 20),
        DatabaseHealth(lambda: pool.fetchval("SELECT 1")),
    )
    recorder.start()
    recorder.submit(first)
    await asyncio.sleep(0.005)  # the writer has taken the first, and waits for company
    assert not recorder.pending
    recorder.submit(second)
    await recorder.close(grace_seconds=10)

    assert batches == [2]
    assert await access_counts(db, [memory]) == [2]


def test_files_sent_inline_are_stored_as_their_size_and_links_as_sent() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg" * 100, "format": "wav"}}
    pdf = {
        "type": "file",
        "file": {"file_data": "data:application/pdf;base64,JVBERi0x", "filename": "a.pdf"},
    }
    linked = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    by_id = {"type": "file", "file": {"file_id": "file-abc"}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, audio, pdf, linked, by_id]},
    ]
    stored = without_inline_files(messages)
    assert stored[0] == messages[0]
    assert stored[1]["content"] == [
        {"type": "text", "text": "hi"},
        {
            "type": "input_audio",
            "input_audio": {"data": "<600 characters not stored>", "format": "wav"},
        },
        {
            "type": "file",
            "file": {
                "file_data": "data:application/pdf;base64,<8 characters not stored>",
                "filename": "a.pdf",
            },
        },
        linked,
        by_id,
    ]
    assert audio["input_audio"]["data"] == "UklGRg" * 100  # the request's own copy is untouched
