"""Shared fixtures: a real embedded PostgreSQL, a fake upstream, and Engram served over HTTP."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.db.embedded import start_embedded
from proxy.db.pool import Pool, apply_schema, create_pool
from proxy.logs import configure_logging
from proxy.settings import Settings
from proxy.telemetry import silence_onnxruntime
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.serving import serve_in_thread

ADMIN_KEY = "test-admin-key-0123456789"
# Lines a test wants shown whatever happens (the chaos test's figures), printed
# in pytest's closing summary.
FIGURES: list[str] = []
PROVIDER_KEY = "sk-test-provider-key"


@dataclass(frozen=True)
class User:
    id: str
    api_key: str


@dataclass(frozen=True)
class Engram:
    """A running Engram and helpers to talk to it."""

    url: str
    settings: Settings

    def create_user(self, email: str | None = None) -> User:
        email = email or f"{uuid.uuid4().hex[:10]}@example.com"
        answer = httpx.post(
            f"{self.url}/users",
            json={"email": email},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert answer.status_code == 201, answer.text
        body = answer.json()
        return User(body["userId"], body["apiKey"])

    def client(self, user: User, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=PROVIDER_KEY,
            default_headers={"X-Engram-Key": user.api_key, **headers},
            max_retries=0,
        )

    def async_client(self, user: User, **headers: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=PROVIDER_KEY,
            default_headers={"X-Engram-Key": user.api_key, **headers},
            max_retries=0,
        )

    def post(self, path: str, user: User | None, body: Any = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if user is not None:
            headers.setdefault("X-Engram-Key", user.api_key)
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, **kwargs)

    def get(self, path: str, user: User | None, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, user, **kwargs)

    def request(self, method: str, path: str, user: User | None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if user is not None:
            headers.setdefault("X-Engram-Key", user.api_key)
        return httpx.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def capture(self, user: User, content: str, **fields: Any) -> dict[str, Any]:
        answer = self.post("/memories/capture", user, {"content": content, **fields})
        assert answer.status_code in (200, 201), answer.text
        body: dict[str, Any] = answer.json()
        return body


@pytest.fixture(scope="session", autouse=True)
def _onnxruntime_reports_nothing() -> None:
    """The test process's own onnxruntime sessions report to no one either (proxy.telemetry)."""
    silence_onnxruntime()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real PostgreSQL with pgvector, started once for the whole session."""
    data_dir = tmp_path_factory.mktemp("postgres") / "data"
    uri = asyncio.run(start_embedded(data_dir, cleanup_mode="delete"))
    asyncio.run(apply_schema(uri))
    return uri


@asynccontextmanager
async def scratch_database(database_url: str) -> AsyncIterator[str]:
    """A database of its own on the session's server, with the schema; dropped afterwards."""
    name = f"engram_scratch_{uuid.uuid4().hex[:8]}"
    server = await asyncpg.connect(database_url)
    try:
        await server.execute(f"CREATE DATABASE {name}")
        try:
            url = urlsplit(database_url)._replace(path=f"/{name}").geturl()
            await apply_schema(url)
            yield url
        finally:
            await server.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await server.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for looking at what Engram wrote."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    """An Engram pool of its own on the session's database, for driving SQL directly."""
    pool = await create_pool(database_url, min_size=1, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    with serve_in_thread(fake.app) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").reset()


@pytest.fixture(scope="session")
def log_stream() -> io.StringIO:
    """Everything every Engram in this session logs, for the secrecy tests."""
    stream = io.StringIO()
    configure_logging("debug", stream)
    return stream


@pytest.fixture(scope="session")
def base_settings(
    database_url: str, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return Settings(
        home=tmp_path_factory.mktemp("engram-home"),
        database_url=database_url,
        openai_base_url=f"{upstream.url}/v1",  # type: ignore[attr-defined]
        admin_key=ADMIN_KEY,
        worker_poll_interval=0.05,
        extraction_retry_base=0.05,
    )


@pytest.fixture(scope="session")
def start_engram(
    base_settings: Settings, log_stream: io.StringIO
) -> Callable[..., AbstractContextManager[Engram]]:
    """Start another Engram with some settings changed."""

    @contextmanager
    def start(**overrides: Any) -> Iterator[Engram]:
        settings = replace(base_settings, **overrides)
        with serve_in_thread(create_app(settings)) as url:
            yield Engram(url, settings)

    return start


@pytest.fixture(scope="session")
def engram(start_engram: Callable[..., AbstractContextManager[Engram]]) -> Iterator[Engram]:
    with start_engram() as running:
        yield running


async def eventually(check: Callable[[], Any], within: float = 10.0, interval: float = 0.05) -> Any:
    """Await `check()` until it returns something truthy, or fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _engram_log_offset(request: pytest.FixtureRequest, log_stream: io.StringIO) -> None:
    request.node.engram_logs = (log_stream, log_stream.tell())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach what Engram logged during a failed test to its report."""
    report = yield
    logs = getattr(item, "engram_logs", None)
    if report.when == "call" and report.failed and logs is not None:
        stream, start = logs
        report.sections.append(("engram logs", stream.getvalue()[start:]))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
