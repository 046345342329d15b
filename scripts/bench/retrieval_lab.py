"""scripts/bench_retrieval_lab: sweep hybrid search's parameters on LoCoMo in seconds, offline.

A replica of proxy/db/memories.py's _HYBRID_SEARCH ranking in numpy, for trying
fusion parameters many times faster than scripts/bench_retrieval (which goes
through Engram's HTTP API once per setting). The inputs are Engram's own: every
turn and question embedded by Engram's model, and their words as PostgreSQL's
to_tsvector('english') reads them (from a throwaway embedded PostgreSQL). Both are
cached in --cache, so later sweeps start at once. Each combination of the given
values is scored (fractional recall@10 per category, as bench_retrieval does).

A replica can drift from the SQL: confirm a setting with scripts/bench_retrieval
(the two agreed within 0.002 on the settings in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from proxy.embeddings import load_model
from proxy.settings import Settings
from scripts.bench import harness, report
from scripts.bench.locomo import Conversation, load_locomo
from scripts.bench.retrieval import CATEGORIES, DEFAULT_LOCOMO, SCORED

LIMIT = 25  # as bench_retrieval asks: candidates per half = 3 x limit
_LEXEME = re.compile(r"'((?:[^']|'')*)'(?::([\d,A-D]+))?")

Words = dict[str, list[int]]  # lexeme -> positions


def parse_tsvector(text: str) -> Words:
    words = {}
    for match in _LEXEME.finditer(text):
        positions = match.group(2) or "0"
        words[match.group(1).replace("''", "'")] = [
            int(p.rstrip("ABCD")) for p in positions.split(",")
        ]
    return words


async def tsvectors(texts: list[str]) -> list[str]:
    with harness.workdir() as root:
        async with harness.embedded_database(root) as url:
            connection = await asyncpg.connect(url)
            try:
                rows = await connection.fetch(
                    "SELECT to_tsvector('english', t)::text FROM unnest($1::text[])"
                    " WITH ORDINALITY u(t, n) ORDER BY n",
                    texts,
                )
            finally:
                await connection.close()
    return [row[0] for row in rows]


@dataclass
class Prepared:
    """One conversation: turn and question vectors, their words, the questions."""

    dia_ids: list[str]
    turns: np.ndarray[Any, Any]
    questions: np.ndarray[Any, Any]
    turn_words: list[Words]
    question_words: list[Words]
    asked: list[tuple[int, tuple[str, ...]]]  # category, evidence


def prepare(conversations: list[Conversation], cache: Path) -> list[Prepared]:
    if cache.exists():
        return load_cache(cache)
    settings = Settings()
    model = load_model(settings.embedding_model, settings.models_dir)

    def embed(texts: list[str]) -> np.ndarray[Any, Any]:
        return np.array([np.asarray(v, dtype=np.float32) for v in model.embed(texts)])

    texts = [
        [turn.content for turn in c.turns] + [question.text for question in c.questions]
        for c in conversations
    ]
    words = iter(asyncio.run(tsvectors([text for group in texts for text in group])))
    prepared = []
    for conversation, group in zip(conversations, texts, strict=True):
        parsed = [parse_tsvector(next(words)) for _ in group]
        turns = len(conversation.turns)
        prepared.append(
            Prepared(
                [turn.dia_id for turn in conversation.turns],
                embed(group[:turns]),
                embed(group[turns:]),
                parsed[:turns],
                parsed[turns:],
                [(q.category, q.evidence) for q in conversation.questions],
            )
        )
    save_cache(cache, prepared)
    return prepared


def save_cache(cache: Path, prepared: list[Prepared]) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    text = [[item.dia_ids, item.turn_words, item.question_words, item.asked] for item in prepared]
    arrays = {f"turns{i}": item.turns for i, item in enumerate(prepared)}
    arrays |= {f"questions{i}": item.questions for i, item in enumerate(prepared)}
    with cache.open("wb") as file:
        np.savez(file, text=np.array(json.dumps(text)), **arrays)


def load_cache(cache: Path) -> list[Prepared]:
    with np.load(cache) as stored:
        text = json.loads(str(stored["text"]))
        return [
            Prepared(
                dia_ids,
                stored[f"turns{i}"],
                stored[f"questions{i}"],
                turn_words,
                question_words,
                [(category, tuple(evidence)) for category, evidence in asked],
            )
            for i, (dia_ids, turn_words, question_words, asked) in enumerate(text)
        ]


def coverage(conversation: Prepared, query: Words, phrase_share: float) -> np.ndarray[Any, Any]:
    """Each turn's word coverage of the query, as the `lexical` CTE computes it."""
    n = len(conversation.turn_words)
    holders = {
        word: [i for i, t in enumerate(conversation.turn_words) if word in t] for word in query
    }
    idf = {w: math.log(1 + (n - len(h) + 0.5) / (len(h) + 0.5)) for w, h in holders.items()}
    total = sum(idf.values()) or 1.0
    weight = np.zeros(n)
    for word, turns in holders.items():
        weight[turns] += idf[word]
    for first, second in itertools.permutations(query, 2):
        if not {p + 1 for p in query[first]} & set(query[second]):
            continue
        for i in holders[first]:
            turn = conversation.turn_words[i]
            if second in turn and {p + 1 for p in turn[first]} & set(turn[second]):
                weight[i] += phrase_share * (idf[first] + idf[second])
    return weight / total


def ranking(
    conversation: Prepared,
    index: int,
    words_weight: float,
    context: float,
    phrase: float,
    depth: int = 2,
) -> list[int]:
    """The turns _HYBRID_SEARCH returns for question `index`, best first."""
    cosine = conversation.turns @ conversation.questions[index]
    cover = coverage(conversation, conversation.question_words[index], phrase)
    candidates_per_half = LIMIT * 3
    semantic = np.argsort(-cosine)[:candidates_per_half]
    matched = np.nonzero(cover > 0)[0]
    # Equal coverages: the newest first (turns are captured in order).
    best_words = matched[np.lexsort((-matched, -cover[matched]))][:candidates_per_half]
    beside = np.zeros(len(cosine))
    for i in best_words:  # turns are captured in order: i ± steps are `steps` captures away
        for steps in range(1, depth + 1):
            for j in (i - steps, i + steps):
                if 0 <= j < len(beside):
                    beside[j] += context**steps * cover[i]
    pool = np.union1d(np.union1d(semantic, best_words), np.nonzero(beside)[0])
    relevance = cosine[pool] + words_weight * (cover[pool] + beside[pool])
    return [int(i) for i in pool[np.argsort(-relevance)][:LIMIT]]


def score(
    prepared: list[Prepared], words_weight: float, context: float, phrase: float, depth: int
) -> dict[str, float]:
    recalls: dict[int, list[float]] = defaultdict(list)
    for conversation in prepared:
        for index, (category, evidence) in enumerate(conversation.asked):
            if not evidence:
                continue
            found = {
                conversation.dia_ids[i]
                for i in ranking(conversation, index, words_weight, context, phrase, depth)[:10]
            }
            recalls[category].append(sum(e in found for e in evidence) / len(evidence))
    result = {CATEGORIES[c]: round(float(np.mean(recalls[c])), 3) for c in sorted(recalls)}
    scored = [r for c in SCORED for r in recalls[c]]
    result["1-4 overall"] = round(float(np.mean(scored)), 4)
    return result


def main(args: argparse.Namespace) -> None:
    prepared = prepare(load_locomo(args.locomo), args.cache)
    rows = []
    for words_weight, context, depth, phrase in itertools.product(
        args.words_weight, args.context_share, args.context_depth, args.phrase_share
    ):
        result = score(prepared, words_weight, context, phrase, depth)
        rows.append((words_weight, context, depth, phrase, *result.values()))
    names = [CATEGORIES[c] for c in sorted(CATEGORIES)] + ["1-4 overall"]
    report.print_table(
        "LoCoMo recall@10 of the hybrid ranking's replica",
        ("words weight", "context share", "context depth", "phrase share", *names),
        rows,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_retrieval_lab", description="Sweep hybrid search's parameters offline."
    )
    parser.add_argument("--locomo", type=Path, default=DEFAULT_LOCOMO)
    parser.add_argument(
        "--cache", type=Path, default=harness.ROOT / "results" / "retrieval_lab.npz"
    )
    parser.add_argument("--words-weight", type=float, nargs="+", default=[0.5])
    parser.add_argument("--context-share", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--context-depth", type=int, nargs="+", default=[2])
    parser.add_argument("--phrase-share", type=float, nargs="+", default=[0.0, 0.5])
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
