"""Writes each call's evidence (conversation + retrieval log) after the answer, never dropping it.

The chat path only enqueues; one background task writes, retrying with backoff
while the database is unavailable. On shutdown it drains what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from proxy.db.evidence import ConversationRecord, RetrievalRecord
from proxy.db.pool import is_outage

log = structlog.get_logger("engram.recorder")

Writer = Callable[[ConversationRecord, RetrievalRecord, str | None], Awaitable[None]]


@dataclass(frozen=True)
class Exchange:
    conversation: ConversationRecord
    retrieval: RetrievalRecord
    credentials_holder: str | None = None  # the process whose memory holds the request's key


class EvidenceRecorder:
    """A queue of exchanges and the task that writes them."""

    def __init__(self, write: Writer, max_backoff: float = 5.0) -> None:
        self._write = write
        self._max_backoff = max_backoff
        self._queue: asyncio.Queue[Exchange] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="evidence-recorder")

    def submit(self, exchange: Exchange) -> None:
        self._queue.put_nowait(exchange)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        await self._queue.join()

    async def close(self, grace_seconds: float) -> None:
        """Drain the queue for up to `grace_seconds`, then stop."""
        try:
            await asyncio.wait_for(self.flush(), grace_seconds)
        except TimeoutError:
            log.error("evidence_not_written", exchanges=self.pending)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            exchange = await self._queue.get()
            try:
                await self._write_with_retry(exchange)
            finally:
                self._queue.task_done()

    async def _write_with_retry(self, exchange: Exchange) -> None:
        delay, failures = 0.05, 0
        while True:
            try:
                await self._write(
                    exchange.conversation, exchange.retrieval, exchange.credentials_holder
                )
                return
            except Exception as error:
                failures += 1
                outage = is_outage(error)
                if not outage and failures >= _MAX_REFUSED_WRITES:
                    # The database answers but refuses the rows (say, the user was
                    # deleted meanwhile): retrying cannot help and would block the queue.
                    log.error(
                        "evidence_refused",
                        conversation_id=str(exchange.conversation.id),
                        error_class=type(error).__name__,
                    )
                    return
                log.warning(
                    "evidence_write_retry",
                    conversation_id=str(exchange.conversation.id),
                    error_class=type(error).__name__,
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)


_MAX_REFUSED_WRITES = 3
