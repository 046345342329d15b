"""The long-lived parts of a running Engram, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

import httpx
import ollama
import structlog
from starlette.requests import Request

from providers.base import Provider
from providers.gemini import GeminiProvider
from providers.ollama import OllamaProvider
from providers.openai import OpenAIProvider
from proxy.auth import Authenticator, Principal, authenticate_request
from proxy.db.embedded import start_embedded, stop_embedded
from proxy.db.evidence import record_exchanges
from proxy.db.pool import Pool, claim_embedding_model, create_pool
from proxy.db.users import KeyRecord, fetch_key
from proxy.embeddings import Embedder
from proxy.health import DatabaseHealth
from proxy.journal import Journal
from proxy.recorder import EvidenceRecorder
from proxy.settings import Settings
from proxy.upstream_http import no_cookies, upstream_client
from proxy.vault import CredentialVault
from proxy.worker import ExtractionWorker

log = structlog.get_logger("engram.services")

ProviderFactory = Callable[[Settings, httpx.AsyncClient], Provider]

# Every upstream Engram can call, by the name a request selects it with.
PROVIDERS: dict[str, ProviderFactory] = {
    "openai": lambda settings, client: OpenAIProvider(client, settings.openai_base_url),
    "ollama": lambda settings, client: OllamaProvider(
        ollama.AsyncClient(
            host=settings.ollama_base_url, timeout=client.timeout, cookies=no_cookies()
        ),
        settings.ollama_base_url,
    ),
    "gemini": lambda settings, client: GeminiProvider(
        client, base_url=settings.gemini_base_url, default_api_key=settings.gemini_api_key
    ),
}


@dataclass(frozen=True)
class Services:
    settings: Settings
    pool: Pool
    embedder: Embedder
    health: DatabaseHealth
    authenticator: Authenticator
    providers: Mapping[str, Provider]
    recorder: EvidenceRecorder
    # This process's name in the job queue, and the request keys it holds for
    # extraction jobs; None when no inline worker runs here to use them.
    instance_id: str
    vault: CredentialVault | None


def services(request: Request) -> Services:
    """The running services, from the lifespan state."""
    return cast(Services, request.state.services)


async def caller(request: Request) -> tuple[Services, Principal]:
    """The services and the authenticated user of a request that needs the database."""
    svc = services(request)
    principal, _ = await authenticate_request(svc.authenticator, request.headers)
    svc.health.require_up()
    return svc, principal


@asynccontextmanager
async def database_url(settings: Settings) -> AsyncIterator[str]:
    """DATABASE_URL, or the embedded PostgreSQL kept under ENGRAM_HOME while in use."""
    if settings.database_url:
        yield settings.database_url
        return
    uri = await start_embedded(settings.embedded_data_dir)
    log.info("embedded_postgres_started", data_dir=str(settings.embedded_data_dir))
    try:
        yield uri
    finally:
        await stop_embedded(settings.embedded_data_dir)


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Start the database, model, HTTP client, writer and worker; close them after."""
    settings.home.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_pool(
            await stack.enter_async_context(database_url(settings)),
            statement_cache_size=settings.db_statement_cache_size,
        )
        stack.push_async_callback(pool.close)
        embedder = await asyncio.to_thread(
            Embedder.load, settings.embedding_model, settings.models_dir
        )
        stack.callback(embedder.close)
        await claim_embedding_model(pool, embedder.name)
        client = upstream_client(settings)
        stack.push_async_callback(client.aclose)
        svc = _assemble(settings, pool, embedder, client)
        for provider in svc.providers.values():
            closing = getattr(provider, "aclose", None)  # adapters owning an SDK client
            if closing is not None:
                stack.push_async_callback(closing)
        await svc.recorder.replay()  # exchanges journaled before a restart
        svc.recorder.start()
        stack.push_async_callback(svc.recorder.close, settings.shutdown_grace)
        stack.push_async_callback(_cancel, asyncio.create_task(svc.health.run_probe()))
        if svc.vault is not None:
            stack.push_async_callback(_start_worker(svc), settings.shutdown_grace)
        stack.callback(gc.unfreeze)
        _freeze_start_up_objects()
        log.info("engram_ready", url=f"http://{settings.host}:{settings.port}",
                 worker=settings.worker, extraction=settings.extraction)  # fmt: skip
        yield svc


def _freeze_start_up_objects() -> None:
    """Keep what start-up made, which lives as long as the process, out of full collections.

    Imports, the model's session and the clients leave ~150,000 objects that
    every full collection walked again: 45-55 ms with the event loop stopped,
    every 15 s or so under load, and each one held up every call in flight.
    Garbage made by start-up is collected first, so nothing frozen is garbage.
    """
    gc.collect()
    gc.freeze()


def _assemble(
    settings: Settings, pool: Pool, embedder: Embedder, client: httpx.AsyncClient
) -> Services:
    inline_worker = settings.worker == "inline" and settings.extraction != "off"
    health = DatabaseHealth(partial(pool.fetchval, "SELECT 1"))

    async def fetch_key_within_budget(key_id: str) -> KeyRecord | None:
        return await health.guard(partial(fetch_key, pool, key_id), settings.auth_db_timeout)

    return Services(
        settings=settings,
        pool=pool,
        embedder=embedder,
        health=health,
        authenticator=Authenticator(
            fetch_key_within_budget, settings.auth_cache_ttl, settings.auth_cache_size
        ),
        providers={name: make(settings, client) for name, make in PROVIDERS.items()},
        recorder=EvidenceRecorder(
            partial(record_exchanges, pool),
            Journal(settings.journal_dir, settings.journal_max_bytes),
            health,
        ),
        instance_id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        vault=CredentialVault(settings.extraction_credentials_ttl) if inline_worker else None,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _start_worker(svc: Services) -> Callable[[float], Awaitable[None]]:
    """Start the inline worker; returns what stops it."""
    assert svc.vault is not None
    worker = ExtractionWorker(
        svc.pool, svc.embedder, svc.providers, svc.settings, svc.vault, svc.instance_id
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping), name="extraction-worker")

    async def stop(grace_seconds: float) -> None:
        stopping.set()
        await stop_worker(task, grace_seconds)

    return stop


async def stop_worker(task: asyncio.Task[None], grace_seconds: float) -> None:
    """Let the worker finish its job in hand; past the grace it is cancelled and releases it."""
    try:
        await asyncio.wait_for(asyncio.shield(task), grace_seconds)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
