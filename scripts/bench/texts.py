"""Synthetic but plausible text: memories, user turns and captures for the benchmarks."""

from __future__ import annotations

import itertools
import random

_TOPICS = (
    "espresso",
    "vegetarian recipes",
    "rock climbing",
    "the Lisbon trip",
    "TypeScript",
    "the quarterly report",
    "marathon training",
    "jazz piano",
    "the kids' school",
    "sourdough",
    "the dentist",
    "Kubernetes",
    "budget spreadsheets",
    "birdwatching",
    "the new apartment",
    "Japanese lessons",
    "chess openings",
    "the wedding",
    "gardening",
    "electric cars",
)
_FACTS = (
    "The user prefers {t} over everything else in that area.",
    "The user is worried about {t} this month.",
    "The user asked for advice on {t} last week.",
    "The user decided to spend less time on {t}.",
    "The user plans to start {t} again in spring.",
    "The user dislikes long explanations about {t}.",
    "The user's partner is enthusiastic about {t}.",
    "The user spent the weekend on {t}.",
    "The user wants weekly reminders about {t}.",
    "The user has a deadline related to {t} on Friday.",
)
_WHEN = (
    "said in January",
    "said in passing",
    "mentioned twice",
    "said while travelling",
    "said at work",
)
_QUESTIONS = (
    "What should I do this weekend?",
    "Can you suggest something for dinner tonight?",
    "Help me plan my week, keeping in mind what I care about.",
    "Any tips for staying motivated with {t}?",
    "Write a short message to a friend about {t}.",
    "What did I say I wanted to change about {t}?",
    "Summarise what you know about my plans for {t}.",
    "I'm tired today. What would cheer me up?",
)


def memory_texts(count: int) -> list[str]:
    """`count` distinct, plausible memories (up to 1,000 before they start to repeat)."""
    combos = itertools.cycle(itertools.product(_WHEN, _FACTS, _TOPICS))
    texts: list[str] = []
    for index, (when, fact, topic) in enumerate(combos):
        if index == count:
            break
        suffix = f" (#{index})" if index >= len(_WHEN) * len(_FACTS) * len(_TOPICS) else ""
        texts.append(f"{fact.format(t=topic)[:-1]}, {when}{suffix}.")
    return texts


def question(index: int) -> str:
    """A distinct user turn per request, so no cache of repeated queries could flatter Engram."""
    template = _QUESTIONS[index % len(_QUESTIONS)]
    return template.format(t=_TOPICS[(index // len(_QUESTIONS)) % len(_TOPICS)]) + f" (#{index})"


_WORDS = (
    ("Maya", "Tom", "my sister", "the landlord", "our team lead", "Grandpa", "the vet", "Priya"),
    (
        "booked",
        "cancelled",
        "recommended",
        "complained about",
        "paid for",
        "forgot",
        "loved",
        "rescheduled",
    ),
    (
        "a pottery class",
        "the flight to Oslo",
        "a new laptop",
        "the gym membership",
        "a birthday dinner",
        "the car service",
        "piano lessons",
        "a hiking trip",
    ),
    (
        "in March",
        "last weekend",
        "for next Tuesday",
        "after work",
        "before the holidays",
        "on her birthday",
        "twice this month",
        "at the last minute",
    ),
    (
        "because of the price",
        "to save time",
        "with two friends",
        "for the kids",
        "despite the rain",
        "as a surprise",
        "on a whim",
        "to try something new",
    ),
)


def capture_text(index: int) -> str:
    """Varied sentences of everyday facts (a few may still merge as near duplicates)."""
    pick = random.Random(index)
    return " ".join(pick.choice(words) for words in _WORDS) + f" (note {index})."
