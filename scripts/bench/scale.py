"""scripts/bench_scale: per-user search at a million memories, and capture throughput.

1. Bulk-load `--memories` rows over `--users` users into a fresh PostgreSQL
   with COPY (asyncpg copy_records_to_table). Vectors are synthetic but
   clustered: `--topics` random unit centres; each user has rows in
   `--user-topics` of them, each row its topic's centre plus Gaussian noise,
   renormalised, so a user's rows sit among many other users' rows of the same
   topics (what made a filtered HNSW scan hard, when Engram had that index). A
   few users own 0.1 % of all rows (and a couple 1 %); the rest get lognormal
   sizes. Rows arrive interleaved across users, as in a table that grew over
   time (`--clustered` loads each user's rows together instead). The indexes
   schema.sql puts on memories, except those behind constraints, are dropped
   for the load.
2. Rebuild them by applying schema.sql again; time, and every index's size.
3. Search as Engram does: proxy.db.memories.search (the same `_SEARCH` SQL,
   and the hybrid SQL with a query text no row's words match, so its fused
   order is the vector order) on a pool from proxy.db.pool.create_pool (the
   same connection set-up, the same prepared statements), warmed up, for a
   sample of ordinary users and every big user, one query at a time. Most
   queries lie near one of the user's topics, a quarter near a topic it has no
   row in. Latency p50/p99 per group, and recall against the exact answer (SQL
   of its own on a connection with index and index-only scans off: it ranks
   every active row of the user, read from the table). The same queries then
   run on experimental pools (scale_search.EXPERIMENTS): Engram's SQL without
   index-only scans; the plans PostgreSQL picks are in the JSON.
4. Capture throughput with real embeddings: Engram serving POST
   /memories/capture on that database, at concurrency 1 and 8.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from scripts.bench import harness, report, stats
from scripts.bench.plot import Series, line_chart
from scripts.bench.scale_data import load, plan_users, rebuild_indexes, topic_centres
from scripts.bench.scale_search import SHIPPED, measure_search, queries, search_groups
from scripts.bench.texts import capture_text


async def measure_capture(
    engram: harness.Engram, concurrency: int, seconds: float, offset: int
) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60.0) as client:
        keys = [
            (await engram.create_user(client, f"capture-{uuid.uuid4().hex[:10]}@example.com"))[1]
            for _ in range(concurrency)
        ]
        for key in keys:  # each key's first use verifies its argon2id hash: not timed
            await client.post(
                f"{engram.url}/memories/search",
                headers={"x-engram-key": key},
                json={"query": "warm-up", "limit": 1},
            )
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        errors = 0
        counter = iter(range(offset, offset + 10_000_000))
        started = time.perf_counter()
        deadline = started + seconds

        async def worker(key: str) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                begun = time.perf_counter()
                answer = await client.post(
                    f"{engram.url}/memories/capture",
                    headers={"x-engram-key": key},
                    json={"content": capture_text(next(counter))},
                )
                latencies.append((time.perf_counter() - begun) * 1000)
                if answer.status_code in (200, 201):
                    status = answer.json()["status"]
                    statuses[status] = statuses.get(status, 0) + 1
                else:
                    errors += 1

        await asyncio.gather(*(worker(key) for key in keys))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "captures": len(latencies),
        "per_second": round(len(latencies) / wall, 1),
        "latency_ms": stats.summary(latencies),
        "statuses": statuses,
        "errors": errors,
    }


def print_results(payload: dict[str, Any]) -> None:
    loaded, indexes = payload["load"], payload["indexes"]
    sizes = ", ".join(f"{name} {mb} MB" for name, mb in indexes["index_mb"].items())
    print(
        f"\nloaded {loaded['rows']} rows in {loaded['copy_seconds']}s "
        f"({loaded['copy_rows_per_second']} rows/s); indexes rebuilt in "
        f"{indexes['rebuild_seconds']}s; heap {indexes['heap_mb']} MB, {sizes}; "
        f"table+indexes {indexes['table_total_mb']} MB"
    )
    rows = []
    for variant, groups in payload["search"].items():
        for name, group in groups.items():
            latency = group["latency_ms"]
            rows.append(
                (
                    variant,
                    name,
                    group["queries"],
                    group["user_rows"]["p50"],
                    latency["p50"],
                    latency["p90"],
                    latency["p99"],
                    "n/a" if group["recall_mean"] is None else group["recall_mean"],
                    "n/a" if group["recall_min"] is None else group["recall_min"],
                    group["short_results"],
                )
            )
    report.print_table(
        f"Per-user search (limit {payload['parameters']['limit']}): recall against exact",
        (
            "path",
            "users",
            "queries",
            "rows/user p50",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "recall mean",
            "recall min",
            "short results",
        ),
        rows,
    )
    capture_rows = [
        (
            c["concurrency"],
            c["captures"],
            c["per_second"],
            c["latency_ms"]["p50"],
            c["latency_ms"]["p99"],
            c["errors"],
            str(c["statuses"]),
        )
        for c in payload["capture"]
    ]
    if capture_rows:
        report.print_table(
            "Capture through POST /memories/capture (real embeddings)",
            ("concurrency", "captures", "per second", "p50 ms", "p99 ms", "errors", "statuses"),
            capture_rows,
        )


def verdicts(payload: dict[str, Any]) -> list[dict[str, Any]]:
    search = payload["search"][SHIPPED]
    rows = payload["load"]["rows"]
    checks = [
        report.verdict(
            f"search p99 at {rows} memories (ms)",
            search["all"]["latency_ms"]["p99"],
            10,
            at_most=True,
        ),
        report.verdict(
            "recall vs exact, all sampled users", search["all"]["recall_mean"], 0.95, at_most=False
        ),
    ]
    if "ordinary" in search:
        checks.append(
            report.verdict(
                "search p99, ordinary users (ms)",
                search["ordinary"]["latency_ms"]["p99"],
                10,
                at_most=True,
            )
        )
    if "0.1%" in search:
        checks.append(
            report.verdict(
                "recall vs exact, users owning 0.1 % of rows",
                search["0.1%"]["recall_mean"],
                0.95,
                at_most=False,
            )
        )
        checks.append(
            report.verdict(
                "search p99, users owning 0.1 % of rows (ms)",
                search["0.1%"]["latency_ms"]["p99"],
                10,
                at_most=True,
            )
        )
    return checks


_SHORT = {
    "exact (from the table)": "exact",
    "engram pool, hybrid": "hybrid",
    "engram pool, hybrid, words every memory holds": "hybrid, common words",
    "exact from the table (no index-only scan)": "table scan",
}


def plot(path: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    """Latency percentiles against how many rows the user owns (log-spaced buckets)."""
    series = []
    for variant, measured in samples.items():
        buckets: dict[int, list[float]] = {}
        for m in measured:
            bucket = 2 ** int(np.log2(max(1, m["user_rows"])))
            buckets.setdefault(bucket, []).append(m["ms"])
        keys = sorted(buckets)
        series += [
            Series(
                f"{_SHORT.get(variant, variant)} {name}",
                [(k, stats.percentile(buckets[k], q)) for k in keys],
                dashed,
            )
            for name, q, dashed in (("p50", 0.5, False), ("p99", 0.99, True))
        ]
    line_chart(
        path,
        "Per-user search latency by the user's memory count",
        "memories of the user",
        "ms",
        series,
        log_x=True,
        log_y=True,
        y_floor=0.05,
        hlines={"p99 target 10 ms": 10},
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    meta = report.machine()
    rng = np.random.default_rng(args.seed)
    users = plan_users(args, rng)
    centres = topic_centres(args.topics, rng)
    payload: dict[str, Any] = {
        "benchmark": "scale",
        "machine": meta,
        "parameters": {
            "memories": args.memories,
            "users": args.users,
            "topics": args.topics,
            "user_topics": args.user_topics,
            "row_order": "clustered by user" if args.clustered else "interleaved",
            "off_topic_queries": args.off_topic,
            "spread": args.spread,
            "big_users_0.1%": args.big_users,
            "huge_users_1%": args.huge_users,
            "limit": args.limit,
            "threshold": args.threshold,
            "seed": args.seed,
            "search": "proxy.db.memories.search on proxy.db.pool.create_pool, one query at a time",
        },
    }
    with harness.workdir(args.keep) as root:
        async with harness.embedded_database(root) as database_url:
            print(f"loading {args.memories} memories for {len(users)} users", flush=True)
            payload["load"] = await load(
                database_url, users, centres, args.spread, rng, args.clustered
            )
            print(f"rebuilding {', '.join(payload['load']['indexes_dropped'])}", flush=True)
            payload["indexes"] = await rebuild_indexes(
                database_url, args.maintenance_work_mem, args.build_workers
            )
            print(f"  rebuilt in {payload['indexes']['rebuild_seconds']}s", flush=True)
            qs = queries(users, args, centres, rng)
            print(f"searching: {len(qs)} queries", flush=True)
            measured, plans = await measure_search(
                database_url, qs, args.limit, args.threshold, args.warmup
            )
            payload["search"] = {name: search_groups(m) for name, m in measured.items()}
            payload["plans"] = plans
            payload["search_samples"] = measured
            capture = []
            if args.capture_seconds > 0:
                with harness.engram_server(root, database_url, "http://127.0.0.1:9") as engram:
                    for index, concurrency in enumerate(args.capture_concurrency):
                        print(f"capturing at concurrency {concurrency}", flush=True)
                        capture.append(
                            await measure_capture(
                                engram, concurrency, args.capture_seconds, index * 1_000_000
                            )
                        )
            payload["capture"] = capture
    print_results(payload)
    payload["verdicts"] = verdicts(payload)
    report.print_verdicts(payload["verdicts"])
    return payload


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_scale", description="Per-user search at scale; capture throughput."
    )
    parser.add_argument("--memories", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--big-users", type=int, default=5, help="users owning 0.1 %% each")
    parser.add_argument("--huge-users", type=int, default=2, help="users owning 1 %% each")
    parser.add_argument("--topics", type=int, default=64, help="clusters of the vectors")
    parser.add_argument("--user-topics", type=int, default=8, help="topics each user has rows in")
    parser.add_argument(
        "--off-topic", type=float, default=0.25, help="share of queries away from the user's topics"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="noise norm around a topic centre (1.0: cosine ~0.5 within a topic)",
    )
    parser.add_argument(
        "--clustered",
        action="store_true",
        help="load each user's rows together (default: interleaved, as a table grows)",
    )
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--sample-users", type=int, default=200)
    parser.add_argument("--queries-per-user", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--maintenance-work-mem", default="4GB")
    parser.add_argument(
        "--build-workers",
        type=int,
        default=1,
        help="max_parallel_maintenance_workers for the index rebuild",
    )
    parser.add_argument("--capture-seconds", type=float, default=20.0, help="0: skip capture")
    parser.add_argument("--capture-concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seed", type=int, default=7)
    report.add_output_options(parser, "bench_scale", "draw latency by user size (PNG)")
    return parser.parse_args()


def cli() -> None:
    report.run_benchmark(
        main, parse_args(), lambda path, payload: plot(path, payload["search_samples"])
    )


if __name__ == "__main__":
    cli()
