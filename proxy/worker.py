"""The extraction worker: claim a job, ask for memories, de-duplicate, store, exactly once.

Any number of workers, in one process or many, share the queue: a claim is
FOR UPDATE SKIP LOCKED under a lease the worker renews while it works, and a
job's memories commit in the same transaction that marks it done, only while
its lease is still this worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Mapping

import structlog

from providers.base import ChatCall, Provider, first_choice_message
from providers.errors import ProviderError
from proxy import extraction
from proxy.db import jobs as job_sql
from proxy.db import memories as memory_sql
from proxy.db.jobs import Job, JobConversation, MemoryWrite
from proxy.db.memories import NewMemory
from proxy.db.pool import Pool
from proxy.embeddings import Embedder
from proxy.extraction import ExistingMemory, Extraction, ExtractionOutputError, Turn
from proxy.memories import content_hash
from proxy.settings import Settings
from proxy.vault import CredentialVault, RequestCredentials

log = structlog.get_logger("engram.worker")

_SIMILAR_SHOWN = 5  # existing memories the model sees, so it can say which one changes
_SIMILAR_THRESHOLD = 0.0  # the model judges relevance; similarity only ranks
_MAX_BACKOFF = 300.0


class JobLost(Exception):
    """The lease ran out and another worker may hold the job now."""


class CredentialsGone(Exception):
    """Neither the request's key (in memory) nor a server-side model is available."""


class JobFailure(Exception):
    """This attempt failed; retried with backoff until ENGRAM_EXTRACTION_MAX_ATTEMPTS."""

    def __init__(self, message: str, raw_output: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.raw_output = raw_output


def server_credentials(settings: Settings) -> RequestCredentials | None:
    """The server-side extraction model and key, when ENGRAM_EXTRACTION_MODEL is set."""
    if settings.extraction_model is None:
        return None
    provider = settings.extraction_provider
    return RequestCredentials(provider, settings.extraction_model, settings.server_key(provider))


class ExtractionWorker:
    """One worker loop. `holder_id` names the process whose vault it can read."""

    def __init__(
        self,
        pool: Pool,
        embedder: Embedder,
        providers: Mapping[str, Provider],
        settings: Settings,
        vault: CredentialVault,
        holder_id: str,
    ) -> None:
        self.pool = pool
        self.embedder = embedder
        self.providers = providers
        self.settings = settings
        self.vault = vault
        self.holder_id = holder_id
        self.worker_id = f"{holder_id}/{uuid.uuid4().hex[:8]}"
        self.server_credentials = server_credentials(settings)

    async def run(self, stopping: asyncio.Event) -> None:
        """Work until `stopping` is set; the job in hand is finished or released."""
        log.info("worker_started", worker_id=self.worker_id, mode=self.settings.extraction)
        while not stopping.is_set():
            try:
                worked = await self.run_once()
            except Exception as error:  # the database may be away: wait and go on
                log.warning("worker_loop_error", error_class=type(error).__name__)
                worked = False
            if not worked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.settings.worker_poll_interval)

    async def run_once(self) -> bool:
        """Claim and process one job; False when none was ready."""
        if self.server_credentials is None and self.settings.extraction == "llm":
            await job_sql.park_stranded(self.pool, self.settings.extraction_credentials_ttl)
        job = await job_sql.claim(
            self.pool,
            self.worker_id,
            self.settings.worker_lease,
            holder=self._claim_filter(),
            include_waiting=self._can_run_any_job(),
        )
        if job is None:
            return False
        try:
            await self._with_lease(job)
        except BaseException:
            # Cancelled (shutdown) mid-job: hand it back for another worker.
            with contextlib.suppress(Exception):
                await asyncio.shield(job_sql.set_aside(self.pool, job, self.worker_id, "pending"))
            raise
        return True

    def _can_run_any_job(self) -> bool:
        return self.settings.extraction == "raw" or self.server_credentials is not None

    def _claim_filter(self) -> str | None:
        return None if self._can_run_any_job() else self.holder_id

    async def _with_lease(self, job: Job) -> None:
        work = asyncio.create_task(self._process(job))
        renewal = asyncio.create_task(self._renew_lease(job, work))
        try:
            await work
        except JobLost:
            log.warning("job_lease_lost", job_id=str(job.id))
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            if not work.done():
                work.cancel()

    async def _renew_lease(self, job: Job, work: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_lease / 3)
            if not await job_sql.renew_lease(
                self.pool, job.id, self.worker_id, self.settings.worker_lease
            ):
                work.cancel()
                return

    async def _process(self, job: Job) -> None:
        if job.attempts > self.settings.extraction_max_attempts:
            # Claimed again after workers died holding it, more times than allowed.
            message = f"abandoned after {job.attempts - 1} attempts by workers that stopped"
            await job_sql.fail(self.pool, job, self.worker_id, message, None)
            return
        conversation = await job_sql.load_conversation(self.pool, job)
        if conversation is None:
            await job_sql.fail(self.pool, job, self.worker_id, "conversation is gone", None)
            return
        try:
            found = await self._extract(job, conversation)
        except CredentialsGone:
            await job_sql.set_aside(self.pool, job, self.worker_id, "waiting")
            log.info("job_waiting_for_credentials", job_id=str(job.id))
            return
        except JobFailure as failure:
            await self._failed_attempt(job, failure)
            return
        writes = await self._writes(job, found)
        stored = await job_sql.complete(
            self.pool, job, self.worker_id, writes, conversation.dedup_threshold, found.rejected
        )
        if stored is None:
            raise JobLost(str(job.id))
        self.vault.discard(job.conversation_id)
        log.info(
            "job_done",
            job_id=str(job.id),
            stored=sum(r.status == "stored" for r in stored),
            merged=sum(r.status == "merged" for r in stored),
            rejected=found.rejected,
        )

    async def _extract(self, job: Job, conversation: JobConversation) -> Extraction:
        turns = extraction.exchange_turns(conversation.messages, conversation.reply)  # type: ignore[arg-type]
        if not turns:
            return Extraction([], 0)
        if self.settings.extraction == "raw":
            return extraction.raw_candidates(turns)
        credentials = self.server_credentials or self.vault.get(job.conversation_id)
        if credentials is None or credentials.provider not in self.providers:
            raise CredentialsGone(str(job.id))
        existing = await self._similar_memories(job, turns)
        output = await self._ask_model(credentials, turns, existing, conversation)
        try:
            return extraction.parse(output, {memory.id for memory in existing})
        except ExtractionOutputError as error:
            raise JobFailure(f"malformed extraction output: {error}", output) from None

    async def _similar_memories(self, job: Job, turns: list[Turn]) -> list[ExistingMemory]:
        query = await self.embedder.embed(extraction.user_text(turns) or turns[-1].text)
        hits = await memory_sql.search(
            self.pool, job.user_id, query, _SIMILAR_SHOWN, _SIMILAR_THRESHOLD
        )
        return [ExistingMemory(hit.id, hit.content) for hit in hits]

    async def _ask_model(
        self,
        credentials: RequestCredentials,
        turns: list[Turn],
        existing: list[ExistingMemory],
        conversation: JobConversation,
    ) -> str:
        body = {
            "model": credentials.model,
            "messages": extraction.prompt(turns, existing, conversation.created_at.date()),
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
        provider = self.providers[credentials.provider]
        try:
            answer = await provider.complete(ChatCall(body, credentials.api_key))  # type: ignore[arg-type]
        except ProviderError as error:
            raise JobFailure(f"extraction model call failed: {error.message}") from None
        message = first_choice_message(answer.body)
        content = message.get("content") if message else None
        if not isinstance(content, str):
            raise JobFailure(
                "extraction model answered without text", answer.body.decode(errors="replace")
            )
        return content

    async def _writes(self, job: Job, found: Extraction) -> list[MemoryWrite]:
        if not found.candidates:
            return []
        vectors = await self.embedder.embed_many([c.content for c in found.candidates])
        return [
            MemoryWrite(
                NewMemory(
                    content=candidate.content,
                    content_hash=content_hash(candidate.content),
                    embedding=vector,
                    metadata={},
                    kind=candidate.kind,
                    confidence=candidate.confidence,
                    source_conversation_id=job.conversation_id,
                ),
                candidate.updates,
            )
            for candidate, vector in zip(found.candidates, vectors, strict=True)
        ]

    async def _failed_attempt(self, job: Job, failure: JobFailure) -> None:
        if job.attempts >= self.settings.extraction_max_attempts:
            await job_sql.fail(self.pool, job, self.worker_id, failure.message, failure.raw_output)
            log.warning("job_failed", job_id=str(job.id), attempts=job.attempts)
            return
        delay = backoff(self.settings.extraction_retry_base, job.attempts)
        await job_sql.retry_later(
            self.pool, job, self.worker_id, delay, failure.message, failure.raw_output
        )
        log.info("job_retry", job_id=str(job.id), attempts=job.attempts, retry_in_s=delay)


def backoff(base: float, attempts: int) -> float:
    """Exponential backoff with full jitter around it, so retries spread out."""
    ceiling = min(base * 2 ** (attempts - 1), _MAX_BACKOFF)
    return float(round(ceiling * random.uniform(0.5, 1.0), 3))  # noqa: S311 - jitter, not secrecy
