"""The `engram` command: serve, worker, jobs, users create, model fetch."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.settings import Settings, SettingsError

if TYPE_CHECKING:
    from proxy.db.pool import Pool

T = TypeVar("T")


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=False,  # Engram writes its own line per request, without secrets
        log_config=None,
        # In-flight streams get this long after SIGTERM; then the lifespan flushes
        # pending writes and releases the worker's job.
        timeout_graceful_shutdown=int(settings.shutdown_grace),
    )
    return 0


async def _with_pool(settings: Settings, use: Callable[[Pool], Awaitable[T]]) -> T:
    """Run `use` with a one-connection pool to the configured database."""
    from proxy.db.pool import create_pool
    from proxy.services import database_url

    async with database_url(settings) as dsn:
        pool = await create_pool(dsn, min_size=1, max_size=1)
        try:
            return await use(pool)
        finally:
            await pool.close()


async def _create_user(settings: Settings, email: str) -> dict[str, str]:
    from proxy.admin import new_user

    return await _with_pool(settings, lambda pool: new_user(pool, email))


def _users_create(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.errors import ProxyError

    try:
        created = asyncio.run(_create_user(settings, args.email))
    except ProxyError as error:
        print(f"engram: {error.message}", file=sys.stderr)
        return 1
    print(json.dumps(created))
    return 0


async def _work(settings: Settings) -> None:
    import signal

    from proxy.db.pool import create_pool
    from proxy.embeddings import Embedder
    from proxy.services import PROVIDERS, database_url
    from proxy.upstream_http import upstream_client
    from proxy.vault import CredentialVault
    from proxy.worker import ExtractionWorker, server_credentials

    if settings.extraction == "llm" and server_credentials(settings) is None:
        print(
            "engram worker: no ENGRAM_EXTRACTION_MODEL is set, and request keys never leave "
            "the API process that received them: jobs will wait until one is configured",
            file=sys.stderr,
        )
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    async with database_url(settings) as dsn:
        pool = await create_pool(dsn)
        embedder = await asyncio.to_thread(
            Embedder.load, settings.embedding_model, settings.models_dir
        )
        client = upstream_client(settings)
        try:
            providers = {name: make(settings, client) for name, make in PROVIDERS.items()}
            vault = CredentialVault(settings.extraction_credentials_ttl)
            worker = ExtractionWorker(pool, embedder, providers, settings, vault, "worker")
            await worker.run(stopping)
        finally:
            await client.aclose()
            await pool.close()
            embedder.close()


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    if settings.extraction == "off":
        print("engram worker: ENGRAM_EXTRACTION=off, nothing to do", file=sys.stderr)
        return 2
    asyncio.run(_work(settings))
    return 0


async def _job_stats(settings: Settings) -> dict[str, Any]:
    from proxy.db.jobs import job_stats

    return await _with_pool(settings, lambda pool: job_stats(pool, None))


def _jobs(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_job_stats(settings)), indent=2))
    return 0


def _model_fetch(settings: Settings, args: argparse.Namespace) -> int:
    from proxy.embeddings import load_model

    load_model(settings.embedding_model, settings.models_dir)
    print(f"embedding model {settings.embedding_model} ready in {settings.models_dir}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Long-term memory for LLM apps.")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the proxy (ENGRAM_HOST:ENGRAM_PORT)")
    serve.set_defaults(run=_serve)
    worker = commands.add_parser("worker", help="run an extraction worker until SIGTERM")
    worker.set_defaults(run=_worker)
    jobs = commands.add_parser("jobs", help="extraction jobs by status, oldest pending, failures")
    jobs.set_defaults(run=_jobs)
    users = commands.add_parser("users", help="manage users").add_subparsers(dest="action")
    create = users.add_parser("create", help="create a user and print its first API key")
    create.add_argument("--email", required=True)
    create.set_defaults(run=_users_create)
    model = commands.add_parser("model", help="the embedding model").add_subparsers(dest="action")
    fetch = model.add_parser("fetch", help="install the embedding model under ENGRAM_HOME")
    fetch.set_defaults(run=_model_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"engram: {error}", file=sys.stderr)
        return 2
    from proxy.logs import configure_logging

    # Logs go to stdout only where the process serves; commands print their answer there.
    configure_logging(settings.log_level, None if args.run in (_serve, _worker) else sys.stderr)
    code: int = args.run(settings, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
