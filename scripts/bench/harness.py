"""What the benchmarks run against: a throwaway PostgreSQL, the fake upstream and Engram.

Engram and the fake upstream each run in a process of their own, as in production:
in one process with the load generator they would share its GIL and event loop, and
every millisecond the generator spent would be booked as Engram's overhead (and the
other way round). Engram runs as `python -m proxy serve`, the same entry point as
`engram serve`, configured through its environment; its JSON log lines (stdout) go
to a file the benchmark reads back for the time split of each request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from proxy.db.embedded import start_embedded, stop_embedded
from proxy.db.pool import apply_schema

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_KEY = "sk-bench-provider-key"
# Variables that would leak the caller's own Engram set-up into the benchmark's.
_FOREIGN_ENV = ("DATABASE_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "GEMINI_API_KEY")


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """A temporary folder for the database, Engram's home and the logs."""
    path = Path(tempfile.mkdtemp(prefix="engram-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def embedded_database(root: Path) -> AsyncIterator[str]:
    """A fresh embedded PostgreSQL with Engram's schema; stopped and deleted afterwards."""
    data_dir = root / "postgres" / "data"
    uri = await start_embedded(data_dir, cleanup_mode="delete")
    try:
        await apply_schema(uri)
        yield uri
    finally:
        await stop_embedded(data_dir)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Served:
    """A child process serving HTTP on loopback."""

    url: str
    process: subprocess.Popen[bytes]
    stdout: Path


@contextlib.contextmanager
def _child(
    name: str, argv: list[str], env: Mapping[str, str], logs: Path, port: int, ready_path: str
) -> Iterator[Served]:
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=err, cwd=ROOT)  # noqa: S603
    served = Served(f"http://127.0.0.1:{port}", process, stdout)
    try:
        _wait_ready(served, ready_path, stderr)
        yield served
    finally:
        _stop(process)


def _wait_ready(served: Served, path: str, stderr: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"{served.url} exited early:\n{stderr.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(served.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{served.url} was not ready within {timeout}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    for name in _FOREIGN_ENV:
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"  # each log line reaches the file when written
    env.update(values)
    return env


@contextlib.contextmanager
def fake_upstream(
    logs: Path, first_token_delay: float, token_interval: float, reply_words: int
) -> Iterator[Served]:
    """tests/fakes' FakeOpenAI with a fixed delay before the first token and a token rate."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "scripts.bench.upstream",
        "--port",
        str(port),
        "--first-token-delay",
        str(first_token_delay),
        "--token-interval",
        str(token_interval),
        "--reply-words",
        str(reply_words),
    ]
    with _child("upstream", argv, _env(), logs, port, "/v1/models") as served:
        yield served


@dataclass(frozen=True)
class Engram:
    """A running Engram process and what a benchmark needs to talk to it."""

    served: Served
    admin_key: str

    @property
    def url(self) -> str:
        return self.served.url

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON line Engram has logged so far."""
        lines = []
        for raw in self.served.stdout.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
        return lines

    def request_logs(self, path: str) -> dict[str, dict[str, Any]]:
        """The one line per request to `path`, by request id (the X-Engram-Request-Id)."""
        return {
            line["request_id"]: line
            for line in self.log_lines()
            if line.get("event") == "request" and line.get("path") == path
        }

    async def create_user(self, client: httpx.AsyncClient, email: str) -> tuple[str, str]:
        """A new user through POST /users: (user id, API key)."""
        answer = await client.post(
            f"{self.url}/users",
            json={"email": email},
            headers={"Authorization": f"Bearer {self.admin_key}"},
        )
        answer.raise_for_status()
        body = answer.json()
        return body["userId"], body["apiKey"]


@contextlib.contextmanager
def engram_server(
    root: Path, database_url: str, upstream_url: str, name: str = "engram", **settings: str
) -> Iterator[Engram]:
    """`python -m proxy serve` on a free loopback port; `settings` are ENGRAM_* overrides.

    Its stdout (the JSON log) and stderr go to <root>/logs/<name>.out and .err.
    """
    port = free_port()
    admin_key = "bench-admin-" + secrets.token_hex(12)
    env = _env(
        DATABASE_URL=database_url,
        OPENAI_BASE_URL=f"{upstream_url}/v1",
        ENGRAM_HOME=str(root / "engram-home"),
        ENGRAM_HOST="127.0.0.1",
        ENGRAM_PORT=str(port),
        ENGRAM_ADMIN_KEY=admin_key,
        ENGRAM_LOG_LEVEL="info",
        ENGRAM_WORKER="off",
        ENGRAM_EXTRACTION="off",
    )
    env.update({f"ENGRAM_{name.upper()}": value for name, value in settings.items()})
    argv = [sys.executable, "-m", "proxy", "serve"]
    with _child(name, argv, env, root / "logs", port, "/healthz") as served:
        yield Engram(served, admin_key)


def _engram_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name.strip().lower().removeprefix("engram_"), value


def add_engram_setting_option(parser: argparse.ArgumentParser) -> None:
    """`--engram-setting NAME=VALUE`, repeatable: start Engram with ENGRAM_<NAME>=VALUE."""
    parser.add_argument(
        "--engram-setting",
        type=_engram_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="start Engram with ENGRAM_<NAME>=VALUE, for experiments (e.g. SEARCH=vector)",
    )


def models_dir(root: Path) -> Path:
    """Where the Engram started by engram_server(root, …) keeps its model folder."""
    return root / "engram-home" / "models"


def run(main: Any) -> Any:
    """Run a benchmark's async main on uvloop, as uvicorn runs Engram."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
