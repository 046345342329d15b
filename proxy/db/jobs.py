"""SQL for the extraction queue: enqueue, claim under a lease, finish exactly once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from proxy.db.memories import CaptureResult, NewMemory, write_memory
from proxy.db.pool import Connection, Pool


@dataclass(frozen=True)
class Job:
    id: UUID
    user_id: UUID
    conversation_id: UUID
    attempts: int
    credentials_holder: str | None


@dataclass(frozen=True)
class JobConversation:
    """What a job needs of its conversation and its user."""

    messages: list[dict[str, Any]]
    reply: dict[str, Any] | None
    provider: str
    model: str
    created_at: datetime
    dedup_threshold: float


@dataclass(frozen=True)
class MemoryWrite:
    memory: NewMemory
    updates: UUID | None = None


async def enqueue_many(
    connection: Connection, jobs: Sequence[tuple[UUID, UUID, str | None]]
) -> None:
    """One job per (user id, conversation id, credentials holder); none twice."""
    await connection.executemany(
        """
        INSERT INTO memory_jobs (user_id, conversation_id, credentials_holder)
        VALUES ($1, $2, $3) ON CONFLICT (conversation_id) DO NOTHING
        """,
        jobs,
    )


async def claim(
    pool: Pool, worker_id: str, lease_seconds: float, *, holder: str | None, include_waiting: bool
) -> Job | None:
    """Take the next runnable job: due and pending, or running under an expired lease.

    `holder` limits the claim to jobs whose credentials this process holds;
    `include_waiting` also takes jobs that wait for a server-side model.
    """
    row = await pool.fetchrow(
        """
        WITH next AS (
            SELECT id FROM memory_jobs
            WHERE ((status = 'pending' AND run_after <= now())
                   OR (status = 'running' AND lease_expires_at < now())
                   OR (status = 'waiting' AND $4))
              AND ($3::text IS NULL OR credentials_holder = $3)
            ORDER BY run_after
            LIMIT 1
            FOR UPDATE SKIP LOCKED
        )
        UPDATE memory_jobs j
        SET status = 'running', attempts = j.attempts + 1, worker_id = $1,
            lease_expires_at = now() + make_interval(secs => $2), updated_at = now()
        FROM next WHERE j.id = next.id
        RETURNING j.id, j.user_id, j.conversation_id, j.attempts, j.credentials_holder
        """,
        worker_id,
        lease_seconds,
        holder,
        include_waiting,
    )
    return Job(**dict(row)) if row is not None else None


async def renew_lease(pool: Pool, job_id: UUID, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer this worker's."""
    renewed = await pool.fetchval(
        """
        UPDATE memory_jobs SET lease_expires_at = now() + make_interval(secs => $3)
        WHERE id = $1 AND worker_id = $2 AND status = 'running'
        RETURNING true
        """,
        job_id,
        worker_id,
        lease_seconds,
    )
    return bool(renewed)


async def load_conversation(pool: Pool, job: Job) -> JobConversation | None:
    row = await pool.fetchrow(
        """
        SELECT c.messages, c.reply, c.provider, c.model, c.created_at, u.dedup_threshold
        FROM conversations c JOIN users u ON u.id = c.user_id
        WHERE c.id = $1 AND c.user_id = $2
        """,
        job.conversation_id,
        job.user_id,
    )
    return JobConversation(**dict(row)) if row is not None else None


async def complete(
    pool: Pool,
    job: Job,
    worker_id: str,
    writes: list[MemoryWrite],
    dedup_threshold: float,
    rejected: int,
) -> list[CaptureResult] | None:
    """Store the memories and finish the job in one transaction; None if it is not ours."""
    async with pool.acquire() as connection, connection.transaction():
        still_ours = await connection.fetchval(
            """
            SELECT true FROM memory_jobs
            WHERE id = $1 AND worker_id = $2 AND status = 'running' FOR UPDATE
            """,
            job.id,
            worker_id,
        )
        if not still_ours:
            return None
        results = [
            await write_memory(
                connection, job.user_id, write.memory, dedup_threshold, write.updates
            )
            for write in writes
        ]
        await connection.execute(
            """
            UPDATE memory_jobs
            SET status = 'done', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
                memories_stored = $2, memories_merged = $3, memories_rejected = $4
            WHERE id = $1
            """,
            job.id,
            sum(result.status == "stored" for result in results),
            sum(result.status == "merged" for result in results),
            rejected,
        )
        await _set_conversation_status(connection, job, "done")
        return results


async def retry_later(
    pool: Pool, job: Job, worker_id: str, delay: float, error: str, raw_output: str | None
) -> None:
    await pool.execute(
        """
        UPDATE memory_jobs
        SET status = 'pending', run_after = now() + make_interval(secs => $3), worker_id = NULL,
            lease_expires_at = NULL, last_error = $4, raw_output = COALESCE($5, raw_output),
            updated_at = now()
        WHERE id = $1 AND worker_id = $2 AND status = 'running'
        """,
        job.id,
        worker_id,
        delay,
        error,
        raw_output,
    )


async def fail(pool: Pool, job: Job, worker_id: str, error: str, raw_output: str | None) -> None:
    """Give up on the job, keeping its last error and the model's raw output."""
    async with pool.acquire() as connection, connection.transaction():
        failed = await connection.fetchval(
            """
            UPDATE memory_jobs
            SET status = 'failed', finished_at = now(), updated_at = now(), worker_id = NULL,
                lease_expires_at = NULL, last_error = $3, raw_output = COALESCE($4, raw_output)
            WHERE id = $1 AND worker_id = $2 AND status = 'running'
            RETURNING true
            """,
            job.id,
            worker_id,
            error,
            raw_output,
        )
        if failed:
            await _set_conversation_status(connection, job, "failed")


async def set_aside(pool: Pool, job: Job, worker_id: str, status: str) -> None:
    """Put a claimed job back, not counting the claim as an attempt.

    status "pending" releases it (shutdown); "waiting" parks it until a
    server-side extraction model is configured (its credentials are gone).
    """
    await pool.execute(
        """
        UPDATE memory_jobs
        SET status = $3, attempts = GREATEST(attempts - 1, 0), worker_id = NULL,
            lease_expires_at = NULL, updated_at = now()
        WHERE id = $1 AND worker_id = $2 AND status = 'running'
        """,
        job.id,
        worker_id,
        status,
    )


async def park_stranded(pool: Pool, credentials_ttl: float) -> int:
    """Pending jobs whose request credentials cannot exist anymore start waiting."""
    result: str = await pool.execute(
        """
        UPDATE memory_jobs SET status = 'waiting', updated_at = now()
        WHERE status = 'pending'
          AND (credentials_holder IS NULL
               OR created_at < now() - make_interval(secs => $1))
        """,
        credentials_ttl,
    )
    return int(result.split()[-1])


async def _set_conversation_status(connection: Connection, job: Job, status: str) -> None:
    await connection.execute(
        "UPDATE conversations SET extraction_status = $3 WHERE id = $1 AND user_id = $2",
        job.conversation_id,
        job.user_id,
        status,
    )


async def job_stats(pool: Pool, user_id: UUID | None, recent_failures: int = 5) -> dict[str, Any]:
    """Jobs by status, the oldest pending job's age, and the latest failures."""
    counts = await pool.fetch(
        """
        SELECT status, count(*) AS n, sum(memories_rejected) AS rejected,
               EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest_age
        FROM memory_jobs WHERE $1::uuid IS NULL OR user_id = $1
        GROUP BY status
        """,
        user_id,
    )
    failures = await pool.fetch(
        """
        SELECT id, conversation_id, attempts, last_error, finished_at FROM memory_jobs
        WHERE status = 'failed' AND ($1::uuid IS NULL OR user_id = $1)
        ORDER BY finished_at DESC LIMIT $2
        """,
        user_id,
        recent_failures,
    )
    by_status = {status: 0 for status in ("pending", "running", "waiting", "done", "failed")}
    by_status.update({row["status"]: row["n"] for row in counts})
    oldest = [float(row["oldest_age"]) for row in counts if row["status"] == "pending"]
    return {
        "jobs": by_status,
        "oldest_pending_age_seconds": round(oldest[0], 3) if oldest else None,
        "memories_rejected": sum(int(row["rejected"] or 0) for row in counts),
        "recent_failures": [
            {
                "id": str(row["id"]),
                "conversation_id": str(row["conversation_id"]),
                "attempts": row["attempts"],
                "last_error": row["last_error"],
                "failed_at": row["finished_at"].isoformat(),
            }
            for row in failures
        ],
    }
