"""scripts/bench_retrieval: does Engram find the right memories? LoCoMo, against BM25.

Each LoCoMo conversation gets a fresh Engram user (POST /users). Every turn is
captured through POST /memories/capture as `<speaker> said, "<text>"` (plus
` and shared <image caption>` when the turn shared a photo), with metadata
{dia_id, speaker} and occurred_at from its session's date. Every question is
then asked through POST /memories/search (threshold 0, limit 25).

Scores are LoCoMo's fractional recall@k (the share of a question's evidence
turns found in the top k, as task_eval/evaluation.py computes it) and NDCG@10
(binary gains: a memory is relevant when it holds an evidence turn). The BM25
baseline (Okapi, k1 = 1.5, b = 0.75, lowercase word tokens) ranks the same
memories for the same questions in the same run. Searching is done once per
ENGRAM_SEARCH mode (`--search vector hybrid`), each by an Engram started with
it on the same database; the targets are checked on Engram's default mode.

With `--one-user`, every conversation is captured into one user instead, one
conversation after the other (2,760 memories for the five of locomo_dev.json):
a user past proxy.db.memories.WORD_READS, whose search reads the memories of
its rarest query words only. A question's evidence is still its own
conversation's turns (another conversation's memories are never relevant), and
BM25 ranks all the user's memories.

Capture merges an exact repeat (same normalised text) or a near duplicate
(cosine ≥ the user's dedup_threshold, 0.9 by default) into one memory whose
metadata keeps only the last dia_id. The benchmark users' dedup_threshold is
set to 1 in SQL, so only exact repeats of a turn merge; a memory's dia_ids are
taken from the capture answers (every turn captured into it), not from its
metadata, so a merged turn still counts as found.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from proxy.settings import Settings
from scripts.bench import harness, report, stats
from scripts.bench.locomo import Conversation, Question, load_locomo
from scripts.bench.plot import Series, line_chart
from scripts.bench.ranking import BM25, ndcg_at, recall_at, reciprocal_rank_fusion

DEFAULT_LOCOMO = harness.ROOT.parent / "shared" / "data" / "locomo" / "locomo_dev.json"
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SCORED = (1, 2, 3, 4)
KS = (5, 10, 25)
SEARCH_LIMIT = 25


@dataclass
class Memories:
    """One conversation's memories: id → the dia_ids captured into it, and its text."""

    dia_ids: dict[str, set[str]] = field(default_factory=dict)
    content: dict[str, str] = field(default_factory=dict)

    def ranked(self, ids: Sequence[str]) -> list[set[str]]:
        return [self.dia_ids.get(memory_id, set()) for memory_id in ids]

    def relevant(self, evidence: Sequence[str]) -> int:
        wanted = set(evidence)
        return sum(1 for dias in self.dia_ids.values() if dias & wanted)


def scores(evidence: Sequence[str], memories: Memories, ids: Sequence[str]) -> dict[str, Any]:
    ranked = memories.ranked(ids)
    result: dict[str, Any] = {f"recall@{k}": recall_at(evidence, ranked, k) for k in KS}
    result["ndcg@10"] = ndcg_at(evidence, ranked, memories.relevant(evidence), 10)
    result["curve"] = [recall_at(evidence, ranked, k) for k in range(1, SEARCH_LIMIT + 1)]
    return result


# ---------------------------------------------------------------------------- through Engram


async def capture_conversation(
    client: httpx.AsyncClient, url: str, api_key: str, conversation: Conversation
) -> tuple[Memories, Counter[str], list[float]]:
    memories, statuses, latencies = Memories(), Counter[str](), []
    for turn in conversation.turns:
        started = time.perf_counter()
        answer = await client.post(
            f"{url}/memories/capture",
            headers={"x-engram-key": api_key},
            json={
                "content": turn.content,
                "metadata": {"dia_id": turn.dia_id, "speaker": turn.speaker},
                "occurred_at": turn.occurred_at.isoformat(),
            },
        )
        latencies.append((time.perf_counter() - started) * 1000)
        answer.raise_for_status()
        body = answer.json()
        statuses[body["status"]] += 1
        memories.dia_ids.setdefault(body["id"], set()).add(turn.dia_id)
        memories.content.setdefault(body["id"], turn.content)
    return memories, statuses, latencies


async def search_all(
    client: httpx.AsyncClient, url: str, api_key: str, questions: Sequence[Question], workers: int
) -> tuple[list[list[str]], list[float]]:
    results: list[list[str]] = [[] for _ in questions]
    latencies: list[float] = []
    pending = iter(range(len(questions)))

    async def worker() -> None:
        for index in pending:
            started = time.perf_counter()
            answer = await client.post(
                f"{url}/memories/search",
                headers={"x-engram-key": api_key},
                json={"query": questions[index].text, "limit": SEARCH_LIMIT, "threshold": 0},
            )
            latencies.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            results[index] = [hit["id"] for hit in answer.json()["results"]]

    await asyncio.gather(*(worker() for _ in range(workers)))
    return results, latencies


@dataclass
class Scored:
    """Per-question scores of each system, with the question's category."""

    category: int
    systems: dict[str, dict[str, Any]]


async def create_users(
    engram: harness.Engram, database_url: str, conversations: list[Conversation], one_user: bool
) -> list[str]:
    """A fresh user per conversation (or one for all), every turn its own memory: the
    API key of each conversation's user."""
    run = uuid.uuid4().hex[:8]
    keys = []
    connection = await asyncpg.connect(database_url)
    try:
        async with httpx.AsyncClient(timeout=60.0) as client:
            for conversation in conversations[:1] if one_user else conversations:
                email = f"locomo-{conversation.sample_id}-{run}@example.com"
                user_id, api_key = await engram.create_user(client, email)
                # Before the key's first use: its user's settings are cached with it.
                await connection.execute(
                    "UPDATE users SET dedup_threshold = 1 WHERE id = $1", uuid.UUID(user_id)
                )
                keys.append(api_key)
    finally:
        await connection.close()
    return keys * len(conversations) if one_user else keys


async def capture_all(
    engram: harness.Engram, keys: list[str], conversations: list[Conversation], one_user: bool
) -> tuple[list[Memories], dict[str, Any]]:
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60.0) as client:
        captures = (
            capture_conversation(client, engram.url, key, c)
            for key, c in zip(keys, conversations, strict=True)
        )
        if one_user:
            # One after another, as a user's history grows: interleaved, the turns
            # of two conversations would be each other's neighbours in capture order.
            captured = [await capture for capture in captures]
        else:
            captured = await asyncio.gather(*captures)
    seconds = time.perf_counter() - started
    turns = sum(len(c.turns) for c in conversations)
    timing = {
        "turns_captured": turns,
        "capture_statuses": dict(sum((s for _, s, _ in captured), Counter[str]())),
        "capture_per_second": round(turns / seconds, 1),
        "capture_latency_ms": stats.summary(x for _, _, lat in captured for x in lat),
    }
    return [memories for memories, _, _ in captured], timing


async def search_everything(
    engram: harness.Engram, keys: list[str], conversations: list[Conversation], workers: int
) -> tuple[list[list[list[str]]], dict[str, Any]]:
    """Every question of every conversation: the ids found, per conversation."""
    started = time.perf_counter()
    results, latencies = [], []
    async with httpx.AsyncClient(timeout=60.0) as client:
        for key, conversation in zip(keys, conversations, strict=True):
            ids, took = await search_all(client, engram.url, key, conversation.questions, workers)
            results.append(ids)
            latencies.extend(took)
    timing = {
        "search_latency_ms": stats.summary(latencies),
        "search_seconds": round(time.perf_counter() - started, 1),
        # Every user holds hundreds of memories: fewer than the limit means the search
        # stopped early (a filtered index scan that ran out of candidates), not a lack of rows.
        "searches_with_fewer_than_limit": sum(
            len(ids) < SEARCH_LIMIT for conversation in results for ids in conversation
        ),
        "searches": sum(len(conversation) for conversation in results),
    }
    return results, timing


def score_all(
    conversations: list[Conversation],
    memories: list[Memories],
    searched: dict[str, list[list[list[str]]]],
    one_user: bool,
) -> list[Scored]:
    """Each question scored for every Engram search mode, BM25, and the offline fusion."""
    scored = []
    merged = {id_: text for memory in memories for id_, text in memory.content.items()}
    for index, (conversation, memory) in enumerate(zip(conversations, memories, strict=True)):
        bm25 = BM25(merged if one_user else memory.content)
        for number, question in enumerate(conversation.questions):
            if not question.evidence:
                continue
            rankings = {f"engram {mode}": ids[index][number] for mode, ids in searched.items()}
            rankings["bm25"] = bm25.rank(question.text, SEARCH_LIMIT)
            if "vector" in searched:
                rankings["rrf(vector,bm25) offline"] = reciprocal_rank_fusion(
                    [searched["vector"][index][number], rankings["bm25"]]
                )
            systems = {
                name: scores(question.evidence, memory, ids) for name, ids in rankings.items()
            }
            scored.append(Scored(question.category, systems))
    return scored


# ---------------------------------------------------------------------------- report


def aggregate(scored: list[Scored], categories: Iterable[int]) -> dict[str, Any]:
    chosen = [s for s in scored if s.category in set(categories)]
    result: dict[str, Any] = {"questions": len(chosen)}
    if not chosen:
        return result
    for system in chosen[0].systems:
        rows = [s.systems[system] for s in chosen]
        names = [m for m in rows[0] if m != "curve"]
        metrics = {m: round(sum(r[m] for r in rows) / len(rows), 4) for m in names}
        metrics["curve"] = [
            round(sum(r["curve"][k] for r in rows) / len(rows), 4) for k in range(SEARCH_LIMIT)
        ]
        result[system] = metrics
    return result


def breakdown(scored: list[Scored]) -> dict[str, Any]:
    groups = {f"{c} {CATEGORIES[c]}": (c,) for c in SCORED}
    groups["1-4 overall"] = SCORED
    groups["5 adversarial (separate)"] = (5,)
    return {name: aggregate(scored, categories) for name, categories in groups.items()}


def print_results(results: dict[str, Any], timing: dict[str, Any]) -> None:
    rows = []
    for name, group in results.items():
        systems = [system for system in group if system != "questions"]
        for system in systems:
            metrics = group[system]
            rows.append(
                (
                    name,
                    system,
                    group["questions"],
                    metrics["recall@5"],
                    metrics["recall@10"],
                    metrics["recall@25"],
                    metrics["ndcg@10"],
                )
            )
    report.print_table(
        "LoCoMo retrieval: fractional recall@k and NDCG@10, every system on the same memories",
        ("category", "system", "n", "R@5", "R@10", "R@25", "NDCG@10"),
        rows,
    )
    capture = timing["capture_latency_ms"]
    print(
        f"\ncaptured {timing['turns_captured']} turns at {timing['capture_per_second']}/s "
        f"({timing['capture_statuses']}), capture p50 {capture['p50']} ms p99 {capture['p99']} ms; "
        f"{timing['questions_without_evidence']} questions without evidence left out"
    )
    for mode, search in timing["search"].items():
        latency = search["search_latency_ms"]
        print(
            f"search ({mode}): p50 {latency['p50']} ms, p99 {latency['p99']} ms; "
            f"{search['searches_with_fewer_than_limit']} of {search['searches']} searches "
            f"returned fewer than {SEARCH_LIMIT} memories"
        )


def default_mode() -> str:
    """The search mode Engram uses when ENGRAM_SEARCH is unset (older Engrams: vector only)."""
    return str(getattr(Settings(), "search", "vector"))


def verdicts(results: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    system = f"engram {mode}"
    overall = results["1-4 overall"][system]["recall@10"]
    checks = [
        report.verdict(f"LoCoMo recall@10, categories 1-4 ({mode})", overall, 0.75, at_most=False)
    ]
    for c in SCORED:
        group = results[f"{c} {CATEGORIES[c]}"]
        if group["questions"]:
            margin = round(group[system]["recall@10"] - group["bm25"]["recall@10"], 4)
            checks.append(
                report.verdict(
                    f"recall@10 minus BM25's, category {c} {CATEGORIES[c]} ({mode})",
                    margin,
                    0.0,
                    at_most=False,
                    strict=True,
                )
            )
    return checks


def plot(path: Path, results: dict[str, Any]) -> None:
    overall = results["1-4 overall"]
    series = [
        Series(name, [(k + 1, value) for k, value in enumerate(metrics["curve"])], "rrf" in name)
        for name, metrics in overall.items()
        if name != "questions"
    ]
    line_chart(
        path,
        "LoCoMo categories 1-4: fractional recall@k",
        "k",
        "recall",
        series,
        hlines={"target R@10 0.75": 0.75},
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    meta = report.machine()
    conversations = load_locomo(args.locomo)
    if args.conversations:
        conversations = conversations[: args.conversations]
    # Capture and search never call a provider: the upstream URL is never dialled.
    nowhere = "http://127.0.0.1:9"
    searched, timing = {}, {"search": {}}
    with harness.workdir(args.keep) as root:
        async with harness.embedded_database(root) as database_url:
            settings = dict(args.engram_setting)
            with harness.engram_server(root, database_url, nowhere, **settings) as engram:
                keys = await create_users(engram, database_url, conversations, args.one_user)
                memories, captured = await capture_all(engram, keys, conversations, args.one_user)
            timing.update(captured)
            for mode in args.search:
                # One Engram per mode (ENGRAM_SEARCH is read at start-up), same database.
                with harness.engram_server(
                    root,
                    database_url,
                    nowhere,
                    name=f"engram-{mode}",
                    **{**settings, "search": mode},
                ) as engram:
                    searched[mode], timing["search"][mode] = await search_everything(
                        engram, keys, conversations, args.workers
                    )
    timing["questions_without_evidence"] = sum(
        1 for c in conversations for q in c.questions if not q.evidence
    )
    results = breakdown(score_all(conversations, memories, searched, args.one_user))
    print_results(results, timing)
    mode = default_mode() if default_mode() in args.search else args.search[0]
    checks = verdicts(results, mode)
    report.print_verdicts(checks)
    return {
        "benchmark": "retrieval",
        "machine": meta,
        "parameters": {
            "locomo": str(args.locomo),
            "conversations": [c.sample_id for c in conversations],
            "search": {
                "limit": SEARCH_LIMIT,
                "threshold": 0,
                "modes": args.search,
                "engram_default_mode": default_mode(),
            },
            "users": "one for all conversations" if args.one_user else "one per conversation",
            "dedup_threshold": 1.0,
            "engram_settings": dict(args.engram_setting),
            "memory_text": 'speaker said, "text" [and shared <blip caption>]',
            "bm25": {"k1": 1.5, "b": 0.75, "tokens": "[a-z0-9]+ of the lowercased text"},
            "rrf offline": "reciprocal rank fusion (k=60) of Engram's vector top 25 and BM25's "
            "top 25, computed in the benchmark: a reference for ENGRAM_SEARCH=hybrid",
            "category_names": CATEGORIES,
        },
        "timing": timing,
        "results": results,
        "verdicts": checks,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_retrieval", description="LoCoMo retrieval quality, Engram vs BM25."
    )
    parser.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    parser.add_argument("--conversations", type=int, default=0, help="only the first N")
    parser.add_argument("--workers", type=int, default=4, help="concurrent searches")
    parser.add_argument(
        "--one-user",
        action="store_true",
        help="capture every conversation into one user, one after another (a big user)",
    )
    parser.add_argument(
        "--search",
        nargs="+",
        default=["vector", "hybrid"],
        help="ENGRAM_SEARCH modes to compare (each searched by its own Engram)",
    )
    harness.add_engram_setting_option(parser)
    report.add_output_options(parser, "bench_retrieval", "draw recall@k for k = 1..25 (PNG)")
    return parser.parse_args()


def cli() -> None:
    report.run_benchmark(main, parse_args(), lambda path, payload: plot(path, payload["results"]))


if __name__ == "__main__":
    cli()
