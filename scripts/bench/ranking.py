"""BM25 Okapi, reciprocal rank fusion, and the ranking metrics (fractional recall@k, NDCG@k)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed set of documents."""

    def __init__(self, documents: dict[str, str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.terms = {doc: Counter(tokens(text)) for doc, text in documents.items()}
        self.lengths = {doc: sum(counts.values()) for doc, counts in self.terms.items()}
        self.average = sum(self.lengths.values()) / max(1, len(self.lengths))
        frequency: Counter[str] = Counter()
        for counts in self.terms.values():
            frequency.update(counts.keys())
        n = len(self.terms)
        self.idf = {t: math.log((n - f + 0.5) / (f + 0.5) + 1) for t, f in frequency.items()}

    def rank(self, query: str, limit: int) -> list[str]:
        query_terms = [t for t in tokens(query) if t in self.idf]
        scores = []
        for doc, counts in self.terms.items():
            norm = self.k1 * (1 - self.b + self.b * self.lengths[doc] / self.average)
            score = sum(
                self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                for t in query_terms
                if t in counts
            )
            if score > 0:
                scores.append((score, doc))
        scores.sort(key=lambda pair: -pair[0])
        return [doc for _, doc in scores[:limit]]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int = 60) -> list[str]:
    fused: Counter[str] = Counter()
    for ranking in rankings:
        for position, doc in enumerate(ranking):
            fused[doc] += 1.0 / (k + position + 1)
    return [doc for doc, _ in fused.most_common()]


def recall_at(evidence: Sequence[str], ranked: Sequence[set[str]], k: int) -> float:
    """LoCoMo's fractional recall: the share of evidence turns in the top k."""
    found: set[str] = set().union(*ranked[:k])
    return sum(e in found for e in evidence) / len(evidence)


def ndcg_at(evidence: Sequence[str], ranked: Sequence[set[str]], relevant: int, k: int) -> float:
    """Binary-gain NDCG@k; `relevant` is how many memories hold an evidence turn."""
    wanted = set(evidence)
    dcg = sum(1 / math.log2(i + 2) for i, dias in enumerate(ranked[:k]) if dias & wanted)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(relevant, k)))
    return dcg / ideal if ideal else 0.0
