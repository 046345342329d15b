"""The local journal: exchanges served while the database was away, kept until replayed.

Append-only JSON lines under ENGRAM_HOME, fsync'd, bounded in size. Replay
moves the file aside first, so new exchanges keep landing in a fresh one, and
writes are idempotent (conversation ids), so a replay cut short by a crash
simply runs again: every exchange reaches the database exactly once.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import structlog

from proxy.db.evidence import ConversationRecord, Exchange, RetrievalRecord

log = structlog.get_logger("engram.journal")


def _encode(exchange: Exchange) -> str:
    retrieval = asdict(exchange.retrieval)
    embedding = exchange.retrieval.query_embedding
    retrieval["query_embedding"] = None if embedding is None else embedding.tolist()
    record = {
        "conversation": asdict(exchange.conversation),
        "retrieval": retrieval,
        "credentials_holder": exchange.credentials_holder,
    }
    return json.dumps(record, default=str, ensure_ascii=False)


def _decode(line: str) -> Exchange:
    record = json.loads(line)
    conversation = record["conversation"]
    retrieval = record["retrieval"]
    embedding = retrieval["query_embedding"]
    return Exchange(
        ConversationRecord(
            **{
                **conversation,
                "id": uuid.UUID(conversation["id"]),
                "user_id": uuid.UUID(conversation["user_id"]),
            }
        ),
        RetrievalRecord(
            **{
                **retrieval,
                "id": uuid.UUID(retrieval["id"]),
                "user_id": uuid.UUID(retrieval["user_id"]),
                "conversation_id": uuid.UUID(retrieval["conversation_id"]),
                "memory_ids": [uuid.UUID(i) for i in retrieval["memory_ids"]],
                "query_embedding": None if embedding is None else np.asarray(embedding, np.float32),
            }
        ),
        record["credentials_holder"],
    )


class Journal:
    """Durable local storage for exchanges the database could not take."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "exchanges.jsonl"
        self.replaying = folder / "exchanges.replaying.jsonl"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._full_logged = False

    def append(self, exchange: Exchange) -> bool:
        """Blocking: write and fsync one exchange; False (and one log line) when full."""
        line = (_encode(exchange) + "\n").encode()
        with self._lock:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(line) > self.max_bytes:
                if not self._full_logged:
                    log.error("journal_full", path=str(self.path), max_bytes=self.max_bytes)
                    self._full_logged = True
                return False
            with self.path.open("ab") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
            return True

    def has_entries(self) -> bool:
        return any(path.exists() and path.stat().st_size > 0 for path in self._files())

    def take(self) -> Iterator[Exchange]:
        """Blocking: the journaled exchanges, oldest first, after moving them aside."""
        with self._lock:
            if self.path.exists() and not self.replaying.exists():
                self.path.rename(self.replaying)
                self._full_logged = False
        if not self.replaying.exists():
            return iter(())
        return (_decode(line) for line in self.replaying.read_text().splitlines() if line)

    def done(self) -> None:
        """Blocking: forget what take() handed out, now that the database has it."""
        self.replaying.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        return [self.replaying, self.path]
