"""The load generator: timed chat requests, in phases that alternate direct and Engram."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from scripts.bench import wire
from scripts.bench.cpu import CpuMeter
from scripts.bench.texts import question


@dataclass(frozen=True)
class Sample:
    ttfb_ms: float
    total_ms: float
    ok: bool
    request_id: str | None = None
    injected: str | None = None
    failure: str | None = None  # why not ok: "status 503", "no [DONE]", an exception


@dataclass(frozen=True)
class Target:
    name: str  # "direct" | "engram"
    url: str
    headers: dict[str, str]


@dataclass
class Runs:
    """All samples and wall time of one target in one configuration."""

    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # by process group

    def add_cpu(self, before: dict[str, float], after: dict[str, float]) -> None:
        for name, value in after.items():
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + value - before.get(name, 0)


Client = httpx.AsyncClient | wire.Connection
CLIENT_KINDS = ("wire", "httpx", "httpx-shared")


async def one_request(client: Client, target: Target, body: bytes) -> Sample:
    if isinstance(client, wire.Connection):
        return await _wire_request(client, target, body)
    return await _httpx_request(client, target, body)


def _sample(
    started: float,
    first: float | None,
    ended: float,
    body: bytes,
    status: int,
    tail: bytes,
    headers: Mapping[str, str],
    head: bytes = b"",
) -> Sample:
    streamed = b'"stream": true' in body
    failure = None
    if status != 200:
        failure = f"status {status}{_error_said(head)}"
    elif first is None:
        failure = "empty body"
    elif streamed and b"[DONE]" not in tail:
        failure = "no [DONE]"
    return Sample(
        ((first or ended) - started) * 1000,
        (ended - started) * 1000,
        failure is None,
        headers.get("x-engram-request-id"),
        headers.get("x-engram-memories-injected"),
        failure,
    )


def _error_said(head: bytes) -> str:
    """` <code>: <message>` of an OpenAI-shaped error body, so a run's failures say why."""
    try:
        error = json.loads(head)["error"]
        return f" {error.get('code')}: {str(error.get('message'))[:160]}"
    except (ValueError, KeyError, TypeError):
        return ""


def _failed(started: float, error: Exception) -> Sample:
    ms = (time.perf_counter() - started) * 1000
    return Sample(ms, ms, False, failure=f"{type(error).__name__}: {error}"[:200])


async def _wire_request(client: wire.Connection, target: Target, body: bytes) -> Sample:
    started = time.perf_counter()
    try:
        answer = await client.post(urlsplit(target.url).path, target.headers, body)
    except (OSError, TimeoutError, wire.WireError) as error:
        return _failed(started, error)
    return _sample(
        started,
        answer.first_byte_at,
        answer.ended_at,
        body,
        answer.status,
        answer.tail,
        answer.headers,
        answer.head,
    )


async def _httpx_request(client: httpx.AsyncClient, target: Target, body: bytes) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    tail = head = b""
    try:
        async with client.stream("POST", target.url, content=body, headers=target.headers) as r:
            async for chunk in r.aiter_raw():
                if first is None:
                    first = time.perf_counter()
                tail = (tail + chunk)[-32:]
                head = (head + chunk)[: wire.HEAD_BYTES]
            return _sample(
                started, first, time.perf_counter(), body, r.status_code, tail, r.headers, head
            )
    except httpx.HTTPError as error:
        return _failed(started, error)


def chat_body(index: int, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": stream,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question(index)},
            ],
        }
    ).encode()


@contextlib.asynccontextmanager
async def worker_clients(count: int, kind: str, url: str) -> AsyncIterator[list[Client]]:
    """One connection per worker to `url`'s host, of the client `kind`.

    "wire" (the default, scripts/bench/wire.py) costs the least CPU, which the
    generator takes from the two cores it measures. "httpx": one single-connection
    httpx.AsyncClient per worker. "httpx-shared": one pooled client for all, which
    spends its time in its own connection pool: measured on this machine against
    the fake upstream alone, 64 workers on one client reached ~90 requests/s with
    the generator's core saturated, and ~690/s at half a core with one client each.
    """
    async with contextlib.AsyncExitStack() as stack:
        if kind == "wire":
            connections = [wire.Connection(url) for _ in range(count)]
            for connection in connections:
                stack.push_async_callback(connection.aclose)
            yield list(connections)
            return
        shared = kind == "httpx-shared"
        size = count if shared else 1
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        clients: list[Client] = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60.0))
            for _ in range(1 if shared else count)
        ]
        yield clients * count if shared else clients


async def run_phase(
    clients: Sequence[Client],
    target: Target,
    stream: bool,
    concurrency: int,
    count: int,
    counter: itertools.count[int],
    max_seconds: float,
) -> tuple[list[Sample], float]:
    """`count` requests from `concurrency` workers (bounded by `max_seconds`)."""
    samples: list[Sample] = []
    issued = itertools.count()
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker(client: Client) -> None:
        while next(issued) < count and time.perf_counter() < deadline:
            samples.append(await one_request(client, target, chat_body(next(counter), stream)))

    await asyncio.gather(*(worker(client) for client in clients[:concurrency]))
    return samples, time.perf_counter() - started


@dataclass(frozen=True)
class Config:
    injection: bool
    stream: bool
    concurrency: int

    @property
    def label(self) -> str:
        inj = "inj on" if self.injection else "inj off"
        return f"{inj}, {'stream' if self.stream else 'no stream'}, c={self.concurrency}"


async def measure(
    config: Config,
    clients: dict[str, list[Client]],
    targets: dict[str, Target],
    requests: int,
    rounds: int,
    max_seconds: float,
    counter: itertools.count[int],
    meter: CpuMeter,
) -> dict[str, Runs]:
    """Alternate direct and Engram phases; the first of each pair swaps every round."""
    runs = {name: Runs() for name in targets}
    warmup = max(8, config.concurrency * 2)
    for name, target in targets.items():
        await run_phase(
            clients[name], target, config.stream, config.concurrency, warmup, counter, max_seconds
        )
    per_round = math.ceil(requests / rounds)
    for round_index in range(rounds):
        order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
        for name in order:
            before = meter.read()
            samples, seconds = await run_phase(
                clients[name],
                targets[name],
                config.stream,
                config.concurrency,
                per_round,
                counter,
                max_seconds / rounds,
            )
            runs[name].samples.extend(samples)
            runs[name].seconds += seconds
            runs[name].add_cpu(before, meter.read())
    return runs
