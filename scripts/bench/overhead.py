"""scripts/bench_overhead: what Engram adds over calling the same upstream directly.

One run starts a throwaway PostgreSQL, the fake upstream (fixed delay before the
first token, fixed token rate) and Engram, each in its own process. A user gets
1,000 memories (real embeddings, inserted straight into the database). Then, for
injection on and off (`X-Engram-Disable-Injection: true`), streaming and not, and
each concurrency, short phases of direct calls and calls through Engram alternate,
so both see the same machine at the same time. Time to first byte is measured by
the client up to the first body byte; Engram's own split of each request (auth,
embed, retrieve, upstream first byte) is read back from its JSON log lines.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import psutil
from pgvector.asyncpg import register_vector

from scripts.bench import cpu, harness, report, stats
from scripts.bench.loadgen import (
    CLIENT_KINDS,
    Client,
    Config,
    Runs,
    Target,
    measure,
    worker_clients,
)
from scripts.bench.plot import Series, line_chart
from scripts.bench.texts import memory_texts

CHAT_PATH = "/v1/chat/completions"
SPLIT_FIELDS = ("auth_ms", "embed_ms", "retrieve_ms", "upstream_first_byte_ms", "total_ms")
DEFAULT_REQUESTS = {1: 100, 16: 480, 64: 960}
LOAD_GENERATORS = {
    "wire": "one keep-alive connection per worker, scripts/bench/wire.py (httptools)",
    "httpx": "one single-connection httpx client per worker",
    "httpx-shared": "one pooled httpx client",
}


async def seed_memories(database_url: str, root: Path, user_id: str, count: int) -> float:
    """Insert `count` memories with real embeddings straight into the database; seconds taken."""
    from proxy.embeddings import load_model
    from proxy.memories import content_hash
    from proxy.settings import OFFLINE_MODEL_NAME

    started = time.perf_counter()
    texts = memory_texts(count)
    model = await asyncio.to_thread(load_model, OFFLINE_MODEL_NAME, harness.models_dir(root))
    vectors = await asyncio.to_thread(lambda: list(model.embed(texts, batch_size=128)))
    records = [
        (uuid.UUID(user_id), text, content_hash(text), np.asarray(vector, dtype=np.float32))
        for text, vector in zip(texts, vectors, strict=True)
    ]
    connection = await asyncpg.connect(database_url)
    try:
        await register_vector(connection)
        await connection.copy_records_to_table(
            "memories", records=records, columns=["user_id", "content", "content_hash", "embedding"]
        )
        await connection.execute("ANALYZE memories")
    finally:
        await connection.close()
    return time.perf_counter() - started


async def memories_table(database_url: str) -> dict[str, Any]:
    """What the run did to the memories table: each retrieval also updates the rows it used."""
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            """
            SELECT s.n_live_tup, s.n_dead_tup, s.n_tup_upd, s.n_tup_hot_upd,
                   s.autovacuum_count, s.vacuum_count,
                   pg_relation_size('memories_user_half_vectors') AS user_vectors_bytes,
                   pg_relation_size('memories') AS heap_bytes
            FROM pg_stat_user_tables s WHERE s.relname = 'memories'
            """
        )
        return dict(row) if row is not None else {}
    finally:
        await connection.close()


def summarise(
    config: Config, runs: dict[str, Runs], logs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    ttfb = {name: stats.summary(s.ttfb_ms for s in r.samples if s.ok) for name, r in runs.items()}
    engram = runs["engram"].samples
    lines = [logs[s.request_id] for s in engram if s.ok and s.request_id in logs]
    split = {name: stats.summary(line.get(name, 0.0) for line in lines) for name in SPLIT_FIELDS}
    split["auth_embed_retrieve_ms"] = stats.summary(
        line.get("auth_ms", 0.0) + line.get("embed_ms", 0.0) + line.get("retrieve_ms", 0.0)
        for line in lines
    )
    return {
        "injection": config.injection,
        "stream": config.stream,
        "concurrency": config.concurrency,
        "ttfb_ms": ttfb,
        "total_ms": {
            name: stats.summary(s.total_ms for s in r.samples if s.ok) for name, r in runs.items()
        },
        "added_ttfb_ms": stats.difference(ttfb["engram"], ttfb["direct"]),
        "rps": {name: round(len(r.samples) / r.seconds, 1) for name, r in runs.items()},
        "requests": {name: len(r.samples) for name, r in runs.items()},
        "errors": {name: sum(not s.ok for s in r.samples) for name, r in runs.items()},
        "failures": {
            name: dict(Counter(s.failure for s in r.samples if not s.ok))
            for name, r in runs.items()
        },
        "memories_injected": dict(Counter(s.injected for s in engram if s.ok)),
        "cpu_ms_per_request": {
            name: {
                group: round(seconds * 1000 / max(1, len(r.samples)), 3)
                for group, seconds in r.cpu_seconds.items()
            }
            for name, r in runs.items()
        },
        "engram_split_ms": split,
        "log_lines_matched": len(lines),
    }


def print_results(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        ttfb, added, split = r["ttfb_ms"], r["added_ttfb_ms"], r["engram_split_ms"]
        rows.append(
            (
                "on" if r["injection"] else "off",
                "yes" if r["stream"] else "no",
                r["concurrency"],
                ttfb["direct"]["p50"],
                ttfb["engram"]["p50"],
                added["p50"],
                added["p90"],
                added["p99"],
                r["rps"]["direct"],
                r["rps"]["engram"],
                f"{r['errors']['direct']}/{r['errors']['engram']}",
                split["auth_ms"]["p50"],
                split["embed_ms"]["p50"],
                split["retrieve_ms"]["p50"],
                split["upstream_first_byte_ms"]["p50"],
            )
        )
    report.print_table(
        "Added time to first byte (Engram minus direct, percentile by percentile), ms",
        (
            "inject",
            "stream",
            "conc",
            "direct p50",
            "engram p50",
            "added p50",
            "added p90",
            "added p99",
            "rps direct",
            "rps engram",
            "errors d/e",
            "auth p50",
            "embed p50",
            "retrieve p50",
            "upstream 1st byte p50",
        ),
        rows,
    )
    print_cpu(results)


def print_cpu(results: list[dict[str, Any]]) -> None:
    """CPU milliseconds per request of each process, in Engram's phases and in direct ones."""
    rows = []
    for r in results:
        engram, direct = r["cpu_ms_per_request"]["engram"], r["cpu_ms_per_request"]["direct"]
        rows.append(
            (
                "on" if r["injection"] else "off",
                "yes" if r["stream"] else "no",
                r["concurrency"],
                engram.get("engram", 0.0),
                engram.get("postgres", 0.0),
                engram.get("upstream", 0.0),
                direct.get("upstream", 0.0),
                engram.get("load generator", 0.0),
                direct.get("load generator", 0.0),
            )
        )
    report.print_table(
        "CPU time per request, ms (2 cores in all: 1000 ms of CPU per second per core)",
        (
            "inject",
            "stream",
            "conc",
            "engram",
            "postgres (engram)",
            "upstream (engram)",
            "upstream (direct)",
            "load gen (engram)",
            "load gen (direct)",
        ),
        rows,
    )


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for r in results:
        if r["concurrency"] != 16:
            continue
        kind = "stream" if r["stream"] else "no stream"
        added = r["added_ttfb_ms"]
        if r["injection"]:
            checks.append(
                report.verdict(
                    f"added TTFB p50, inj on, c=16, {kind} (ms)", added["p50"], 10, at_most=True
                )
            )
            checks.append(
                report.verdict(
                    f"added TTFB p99, inj on, c=16, {kind} (ms)", added["p99"], 25, at_most=True
                )
            )
        else:
            checks.append(
                report.verdict(
                    f"added TTFB p50, inj off, c=16, {kind} (ms)", added["p50"], 2, at_most=True
                )
            )
    for r in results:
        if r["injection"]:
            ok = r["errors"]["engram"] == 0
            kind = "stream" if r["stream"] else "no stream"
            errors = "0" if ok else ">0"
            name = f"memory-augmented rps, c={r['concurrency']}, {kind} (errors {errors})"
            value = r["rps"]["engram"] if ok else 0.0
            if r["concurrency"] == max(x["concurrency"] for x in results):
                checks.append(report.verdict(name, value, 150, at_most=False))
    return checks


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    series = []
    for injection, stream in itertools.product((True, False), (False, True)):
        chosen = [r for r in results if r["injection"] == injection and r["stream"] == stream]
        name = f"inj {'on' if injection else 'off'}, {'stream' if stream else 'no stream'}"
        for quantile, dashed in (("p50", False), ("p99", True)):
            points = [(r["concurrency"], r["added_ttfb_ms"][quantile]) for r in chosen]
            series.append(Series(f"{name} {quantile}", points, dashed))
    line_chart(
        path,
        "Engram's added time to first byte (p50 solid, p99 dashed)",
        "concurrency",
        "added ms",
        series,
        log_x=True,
        log_y=True,
        hlines={"p99 target 25 ms": 25, "p50 target 10 ms": 10},
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    meta = report.machine()
    configs = [
        Config(injection, stream, concurrency)
        for injection in (True, False)
        for stream in (False, True)
        for concurrency in args.concurrency
    ]
    with harness.workdir(args.keep) as root:
        async with harness.embedded_database(root) as database_url:
            worker = "inline" if args.extraction != "off" else "off"
            with (
                harness.fake_upstream(
                    root / "logs", args.first_token_delay, args.token_interval, args.reply_words
                ) as upstream,
                harness.engram_server(
                    root,
                    database_url,
                    upstream.url,
                    extraction=args.extraction,
                    worker=worker,
                    **dict(args.engram_setting),
                ) as engram,
            ):
                workers = max(args.concurrency)
                async with (
                    httpx.AsyncClient(timeout=60.0) as admin,
                    worker_clients(workers, args.client, upstream.url) as direct_clients,
                    worker_clients(workers, args.client, engram.url) as engram_clients,
                ):
                    user_id, api_key = await engram.create_user(
                        admin, f"bench-{uuid.uuid4().hex[:8]}@example.com"
                    )
                    seeded = await seed_memories(database_url, root, user_id, args.memories)
                    print(f"seeded {args.memories} memories in {seeded:.1f}s", flush=True)
                    table_before = await memories_table(database_url)
                    clients = {"direct": direct_clients, "engram": engram_clients}
                    meter = cpu.CpuMeter(processes(root, engram, upstream))
                    results = await _measure_all(
                        args, configs, engram, upstream.url, api_key, clients, meter
                    )
                await asyncio.sleep(1.0)  # the last log lines are written after the last byte
                logs = engram.request_logs(CHAT_PATH)
                table_after = await memories_table(database_url)
                summaries = [summarise(config, runs, logs) for config, runs in results]
    payload = {
        "benchmark": "overhead",
        "machine": meta,
        "parameters": {
            "first_token_delay_s": args.first_token_delay,
            "token_interval_s": args.token_interval,
            "reply_words": args.reply_words,
            "memories": args.memories,
            "rounds": args.rounds,
            "requests_per_target": {str(c): requests_for(args, c) for c in args.concurrency},
            "extraction": args.extraction,
            "engram_settings": dict(args.engram_setting),
            "load_generator": LOAD_GENERATORS[args.client],
            "engram": "python -m proxy serve (uvicorn, uvloop, httptools), separate process",
            "ttfb": "client-side, request sent to first response body byte",
        },
        "results": summaries,
        "memories_table": {"after_seeding": table_before, "after_run": table_after},
    }
    print_results(summaries)
    print(f"\nmemories table after seeding: {table_before}\nafter the run: {table_after}")
    payload["verdicts"] = verdicts(summaries)
    report.print_verdicts(payload["verdicts"])
    return payload


async def _measure_all(
    args: argparse.Namespace,
    configs: list[Config],
    engram: harness.Engram,
    upstream_url: str,
    api_key: str,
    clients: dict[str, list[Client]],
    meter: cpu.CpuMeter,
) -> list[tuple[Config, dict[str, Runs]]]:
    auth = {"authorization": f"Bearer {harness.PROVIDER_KEY}", "content-type": "application/json"}
    counter = itertools.count()
    results = []
    for config in configs:
        engram_headers = {**auth, "x-engram-key": api_key}
        if not config.injection:
            engram_headers["x-engram-disable-injection"] = "true"
        targets = {
            "direct": Target("direct", upstream_url + CHAT_PATH, auth),
            "engram": Target("engram", engram.url + CHAT_PATH, engram_headers),
        }
        started = time.perf_counter()
        runs = await measure(
            config,
            clients,
            targets,
            requests_for(args, config.concurrency),
            args.rounds,
            args.max_seconds,
            counter,
            meter,
        )
        failures = Counter(s.failure for s in runs["engram"].samples if not s.ok)
        errors = sum(failures.values())
        print(
            f"{config.label}: {time.perf_counter() - started:.1f}s, "
            f"{len(runs['engram'].samples)} requests per target, {errors} Engram errors"
            + (f" {dict(failures)}" if failures else ""),
            flush=True,
        )
        results.append((config, runs))
    return results


def processes(root: Path, engram: harness.Engram, upstream: harness.Served) -> cpu.Processes:
    """The process groups whose CPU time each phase reports."""
    fixed = {
        "engram": [psutil.Process(engram.served.process.pid)],
        "upstream": [psutil.Process(upstream.process.pid)],
        "load generator": [psutil.Process()],
    }
    return lambda: {**fixed, "postgres": cpu.postgres(root / "postgres" / "data")}


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    if args.requests:
        return int(args.requests)
    return DEFAULT_REQUESTS.get(concurrency, concurrency * 25)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_overhead", description="Engram's added latency over a direct call."
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per target per configuration "
        "(default: 100 at c=1, 480 at c=16, 960 at c=64)",
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="direct/Engram phase pairs per configuration"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="time bound per target per configuration"
    )
    parser.add_argument("--first-token-delay", type=float, default=0.05)
    parser.add_argument("--token-interval", type=float, default=0.002)
    parser.add_argument("--reply-words", type=int, default=16)
    parser.add_argument("--memories", type=int, default=1000)
    parser.add_argument(
        "--extraction",
        choices=("off", "raw", "llm"),
        default="off",
        help="Engram's ENGRAM_EXTRACTION (an inline worker runs unless off)",
    )
    harness.add_engram_setting_option(parser)
    parser.add_argument(
        "--client",
        choices=CLIENT_KINDS,
        default="wire",
        help="the load generator's HTTP client: wire (lean, httptools; the default), "
        "httpx (one client per worker) or httpx-shared (one pooled client: shows its cost)",
    )
    report.add_output_options(parser, "bench_overhead", "draw added TTFB against concurrency (PNG)")
    return parser.parse_args()


def cli() -> None:
    report.run_benchmark(main, parse_args(), lambda path, payload: plot(path, payload["results"]))


if __name__ == "__main__":
    cli()
