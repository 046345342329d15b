"""LoCoMo conversations, turns and questions, read from the dataset's JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_DIA_ID = re.compile(r"^D(\d+):(\d+)$")


@dataclass(frozen=True)
class Turn:
    dia_id: str
    speaker: str
    text: str
    caption: str | None
    occurred_at: datetime

    @property
    def content(self) -> str:
        said = f'{self.speaker} said, "{self.text}"'
        return f"{said} and shared {self.caption}" if self.caption else said


@dataclass(frozen=True)
class Question:
    text: str
    category: int
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Conversation:
    sample_id: str
    turns: list[Turn]
    questions: list[Question]


def session_date(text: str) -> datetime:
    """LoCoMo's "1:56 pm on 8 May, 2023" (taken as UTC)."""
    return datetime.strptime(text, "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def evidence_ids(raw: Iterable[str]) -> tuple[str, ...]:
    """Evidence dia_ids, repairing the dataset's slips ("D8:6; D9:17", "D:11:26")."""
    ids = []
    for entry in raw:
        for piece in re.split(r"[;,\s]+", entry):
            piece = re.sub(r"^D:(\d+)", r"D\1", piece.strip())
            if _DIA_ID.match(piece):
                ids.append(piece)
    return tuple(ids)


def load_locomo(path: Path) -> list[Conversation]:
    conversations = []
    for sample in json.loads(path.read_text()):
        sessions = sample["conversation"]
        turns = []
        numbers = sorted(
            int(key.split("_")[1])
            for key, value in sessions.items()
            if key.startswith("session_") and isinstance(value, list)
        )
        for number in numbers:
            when = session_date(sessions[f"session_{number}_date_time"])
            for turn in sessions[f"session_{number}"]:
                turns.append(
                    Turn(
                        turn["dia_id"],
                        turn["speaker"],
                        turn["text"],
                        turn.get("blip_caption"),
                        when,
                    )
                )
        questions = [
            Question(qa["question"], int(qa["category"]), evidence_ids(qa.get("evidence", [])))
            for qa in sample["qa"]
        ]
        conversations.append(Conversation(sample["sample_id"], turns, questions))
    return conversations
