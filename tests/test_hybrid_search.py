"""Hybrid search: full-text matches fused with vector neighbours, rare words weighing most."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Engram, User

pytestmark = pytest.mark.anyio

ANIMALS = ["rabbit", "hamster", "parrot", "goldfish", "tortoise", "ferret", "gecko", "canary"]
NEEDLE = "The user's locker at the Brisbane gym has the code Quetzalcoatl-7."


async def fill(engram: Engram, user: User, db: asyncpg.Connection) -> str:
    """Forty memories sharing the query's common words, and one holding its rare ones."""
    await db.execute("UPDATE users SET dedup_threshold = 1 WHERE id = $1::uuid", user.id)
    for n in range(40):
        engram.capture(user, f"The user's friend number {n} keeps a {ANIMALS[n % 8]} as a pet.")
    return str(engram.capture(user, NEEDLE)["id"])


def search(engram: Engram, user: User, query: str, **options: float) -> list[dict[str, object]]:
    body = {"query": query, "limit": 5, "threshold": 0, **options}
    results: list[dict[str, object]] = engram.post("/memories/search", user, body).json()["results"]
    return results


async def test_common_words_do_not_drown_a_rare_one(engram: Engram, db: asyncpg.Connection) -> None:
    user = engram.create_user()
    needle = await fill(engram, user, db)
    # "pet" and "friend" match forty memories, "Brisbane" and "gym" one: without
    # weighting words by rarity, the forty crowded the best vector match out.
    hits = search(engram, user, "What pet did the friend bring to the Brisbane gym?")
    assert hits[0]["id"] == needle


async def test_the_threshold_still_applies_to_the_cosine_score(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    needle = await fill(engram, user, db)
    hits = search(engram, user, "Brisbane gym locker code", threshold=0.5)
    assert [hit["id"] for hit in hits] == [needle]
    assert all(float(str(hit["score"])) >= 0.5 for hit in hits)


async def test_a_query_of_stop_words_alone_falls_back_to_vectors(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    await fill(engram, user, db)
    assert len(search(engram, user, "what is it?")) == 5


async def test_a_common_word_alone_does_not_outrank_the_meaning(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    await fill(engram, user, db)
    flight = str(engram.capture(user, "Tomorrow morning I fly out to Tokyo for two weeks.")["id"])
    # Only "user's" matches any memory (forty of them); "trip" and "Japan" match
    # none, so they hold nearly all the query's word weight and the forty gain
    # almost nothing. Ranked by places, not scores, the forty came first.
    hits = search(engram, user, "When does the user's trip to Japan start?")
    assert hits[0]["id"] == flight
