"""Writes each call's evidence after the answer, and loses none of it.

The chat path only enqueues. One background task writes the exchanges (each
one's conversation row, retrieval log and extraction job) to the database,
those that come within a few milliseconds of each other in one transaction;
while the database is away it appends them to the local journal instead, and
replays the journal once the database is back. On shutdown it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import structlog

from proxy.db.evidence import Exchange
from proxy.db.pool import is_outage
from proxy.health import DatabaseHealth
from proxy.journal import Journal

log = structlog.get_logger("engram.recorder")

Writer = Callable[[Sequence[Exchange]], Awaitable[None]]

_MAX_REFUSED_WRITES = 3
# Exchanges written in one transaction, at most. Under load one commit then
# carries many calls' rows: 6 round trips and a WAL flush per call cost
# PostgreSQL more CPU than the call's retrieval query.
_MAX_BATCH = 64
# How long the writer waits, once an exchange has come, for others to share its
# transaction: calls that end together (a client's burst of requests, streams
# finishing side by side) then cost one commit. At 16 calls in flight a batch
# held 2.3 exchanges without it and 7-8 with it, and a call without injection
# cost 1.46 → 1.22-1.28 ms of Engram's CPU and 0.26 → 0.14 ms of PostgreSQL's
# (scripts/BENCHMARKS.md, experiments). Only the evidence waits, not an answer.
BATCH_WINDOW_SECONDS = 0.02
_REPLAY_INTERVAL = 0.5


class EvidenceRecorder:
    """A queue of exchanges and the tasks that write and replay them."""

    def __init__(self, write: Writer, journal: Journal, health: DatabaseHealth) -> None:
        self._write = write
        self._journal = journal
        self._health = health
        self._queue: asyncio.Queue[Exchange] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="evidence-recorder"),
            asyncio.create_task(self._replay_forever(), name="journal-replay"),
        ]

    def submit(self, exchange: Exchange) -> None:
        self._queue.put_nowait(exchange)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def flush(self) -> None:
        """Wait until everything submitted so far is written or journaled."""
        await self._queue.join()

    async def close(self, grace_seconds: float) -> None:
        """Drain the queue for up to `grace_seconds`, then stop."""
        try:
            await asyncio.wait_for(self.flush(), grace_seconds)
        except TimeoutError:
            log.error("evidence_not_written", exchanges=self.pending)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def replay(self) -> int:
        """Write the journaled exchanges to the database; how many there were."""
        exchanges = await asyncio.to_thread(lambda: list(self._journal.take()))
        for exchange in exchanges:
            try:
                await self._write([exchange])  # idempotent: a cut-short replay runs again
            except Exception as error:
                if is_outage(error):
                    raise  # the file stays; the next recovery replays it again
                log.warning("journal_entry_refused", error_class=type(error).__name__,
                            conversation_id=str(exchange.conversation.id))  # fmt: skip
        await asyncio.to_thread(self._journal.done)
        if exchanges:
            log.info("journal_replayed", exchanges=len(exchanges))
        return len(exchanges)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            try:
                await asyncio.sleep(BATCH_WINDOW_SECONDS)
                while len(batch) < _MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._store_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _store_batch(self, batch: list[Exchange]) -> None:
        if len(batch) > 1 and self._health.up:
            try:
                await self._write(batch)
                return
            except Exception as error:
                if is_outage(error):
                    self._health.mark_down(error)
                # Otherwise one of them is refused: each alone, so the others land.
        for exchange in batch:
            await self._store(exchange)

    async def _store(self, exchange: Exchange) -> None:
        for attempt in range(1, _MAX_REFUSED_WRITES + 1):
            if not self._health.up:
                break
            try:
                await self._write([exchange])
                return
            except Exception as error:
                if is_outage(error):
                    self._health.mark_down(error)
                    break
                # The database answers but refuses the rows (say, the user was
                # deleted meanwhile): a few tries, then it cannot be helped.
                log.warning("evidence_refused", conversation_id=str(exchange.conversation.id),
                            error_class=type(error).__name__, attempt=attempt)  # fmt: skip
                if attempt == _MAX_REFUSED_WRITES:
                    return
                await asyncio.sleep(0.05 * attempt)
        if not await asyncio.to_thread(self._journal.append, exchange):
            log.error("evidence_lost", conversation_id=str(exchange.conversation.id))

    async def _replay_forever(self) -> None:
        while True:
            await asyncio.sleep(_REPLAY_INTERVAL)
            if not self._health.up or not self._journal.has_entries():
                continue
            try:
                await self.replay()
            except Exception as error:
                if is_outage(error):
                    self._health.mark_down(error)
                else:
                    log.exception("journal_replay_failed", error_class=type(error).__name__)
