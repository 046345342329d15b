"""The load generator: timed chat requests, in phases that alternate direct and Engram."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx

from scripts.bench.cpu import CpuMeter
from scripts.bench.texts import question


@dataclass(frozen=True)
class Sample:
    ttfb_ms: float
    total_ms: float
    ok: bool
    request_id: str | None = None
    injected: str | None = None


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


async def one_request(client: httpx.AsyncClient, target: Target, body: bytes) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    tail = b""
    try:
        async with client.stream("POST", target.url, content=body, headers=target.headers) as r:
            async for chunk in r.aiter_raw():
                if first is None:
                    first = time.perf_counter()
                tail = (tail + chunk)[-32:]
            ended = time.perf_counter()
            streamed = b'"stream": true' in body
            ok = r.status_code == 200 and first is not None
            ok = ok and (not streamed or b"[DONE]" in tail)
            return Sample(
                ((first or ended) - started) * 1000,
                (ended - started) * 1000,
                ok,
                r.headers.get("x-engram-request-id"),
                r.headers.get("x-engram-memories-injected"),
            )
    except httpx.HTTPError:
        ended = time.perf_counter()
        return Sample((ended - started) * 1000, (ended - started) * 1000, False)


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
async def worker_clients(
    count: int, shared: bool = False
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One single-connection client per worker (or, `shared`, one pooled client for all).

    A single httpx.AsyncClient shared by 64 workers spends its time in its own
    connection pool: measured on this machine against the fake upstream alone,
    64 workers on one client reached ~90 requests/s with the generator's core
    saturated, and ~690/s at half a core with one client each. The generator
    must never be what is measured; `shared` is there to show that effect.
    """
    size = count if shared else 1
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60.0))
            for _ in range(1 if shared else count)
        ]
        yield clients * count if shared else clients


async def run_phase(
    clients: Sequence[httpx.AsyncClient],
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

    async def worker(client: httpx.AsyncClient) -> None:
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
    clients: dict[str, list[httpx.AsyncClient]],
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
