"""Pure translation of Gemini's answers into OpenAI chat.completion JSON and stream chunks.

Gemini has no tool call ids: each call gets a `call_…` id when it is first seen, kept for
the rest of the response. A call's thought signature travels in the tool call's
`extra_content.google.thought_signature`, as Gemini's own OpenAI endpoint sends it.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

from google.genai import types

from providers.types import ChoiceDelta, ChunkChoice

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]

_FILTERED: FinishReason = "content_filter"
_FINISH_REASONS: dict[types.FinishReason, FinishReason] = {
    types.FinishReason.STOP: "stop",
    types.FinishReason.MAX_TOKENS: "length",
    types.FinishReason.SAFETY: _FILTERED,
    types.FinishReason.RECITATION: _FILTERED,
    types.FinishReason.BLOCKLIST: _FILTERED,
    types.FinishReason.PROHIBITED_CONTENT: _FILTERED,
    types.FinishReason.SPII: _FILTERED,
    types.FinishReason.IMAGE_SAFETY: _FILTERED,
    types.FinishReason.IMAGE_PROHIBITED_CONTENT: _FILTERED,
    types.FinishReason.MODEL_ARMOR: _FILTERED,
}


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: NotRequired[list[dict[str, Any]]]


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class CompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: NotRequired[Usage | None]


def from_gemini(response: types.GenerateContentResponse, model: str) -> ChatCompletion:
    """The chat.completion for a whole generateContent answer."""
    candidates = response.candidates or []
    choices = [_choice(_index(c, position), c) for position, c in enumerate(candidates)]
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices or [_empty_choice(response)],
        "usage": usage(response.usage_metadata),
    }


def _choice(index: int, candidate: types.Candidate) -> Choice:
    parts = _answer_parts(candidate)
    text = "".join(part.text for part in parts if part.text)
    calls = [tool_call(part) for part in parts if part.function_call]
    message: AssistantMessage = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    reason = finish_reason(candidate.finish_reason, bool(calls)) or "stop"
    return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


def _empty_choice(response: types.GenerateContentResponse) -> Choice:
    """No candidates at all: the prompt itself was blocked, or nothing was generated."""
    reason: FinishReason = _FILTERED if _prompt_blocked(response) else "stop"
    message: AssistantMessage = {"role": "assistant", "content": None, "refusal": None}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}


def _prompt_blocked(response: types.GenerateContentResponse) -> bool:
    return bool(response.prompt_feedback and response.prompt_feedback.block_reason)


def _index(candidate: types.Candidate, position: int) -> int:
    return candidate.index if candidate.index is not None else position


def _answer_parts(candidate: types.Candidate) -> list[types.Part]:
    """The parts the client sees: the model's thoughts stay behind."""
    parts = candidate.content.parts if candidate.content else None
    return [part for part in parts or [] if not part.thought]


def tool_call(part: types.Part) -> dict[str, Any]:
    """One OpenAI tool call for a function_call part, with a fresh id unless Gemini gave one."""
    call = part.function_call
    assert call is not None
    entry: dict[str, Any] = {
        "id": call.id or call_id(),
        "type": "function",
        "function": {
            "name": call.name or "",
            "arguments": json.dumps(call.args or {}, ensure_ascii=False),
        },
    }
    if part.thought_signature:
        signature = base64.b64encode(part.thought_signature).decode("ascii")
        entry["extra_content"] = {"google": {"thought_signature": signature}}
    return entry


def finish_reason(reason: types.FinishReason | None, called_tools: bool) -> FinishReason | None:
    """OpenAI's finish_reason; None while a streamed candidate is still going."""
    if reason is None:
        return None
    if called_tools and reason == types.FinishReason.STOP:
        return "tool_calls"
    return _FINISH_REASONS.get(reason, "stop")


def usage(metadata: types.GenerateContentResponseUsageMetadata | None) -> Usage:
    """OpenAI usage: thinking counts as completion tokens, as OpenAI's reasoning tokens do."""
    meta = metadata or types.GenerateContentResponseUsageMetadata()
    prompt = (meta.prompt_token_count or 0) + (meta.tool_use_prompt_token_count or 0)
    thoughts = meta.thoughts_token_count or 0
    completion = (meta.candidates_token_count or 0) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": meta.total_token_count or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": meta.cached_content_token_count or 0},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class _ChoiceState:
    started: bool = False
    tool_calls: int = 0
    finished: bool = False


class ChunkTranslator:
    """Gemini's streamed responses → OpenAI chat.completion.chunk events, in order.

    feed() each response as it arrives; finish() gives the usage chunk (when asked
    for) once the upstream stream has ended.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model = model
        self._include_usage = include_usage
        self._choices: dict[int, _ChoiceState] = {}
        self._usage: types.GenerateContentResponseUsageMetadata | None = None

    @property
    def finished(self) -> bool:
        """Every choice seen has had its finish_reason."""
        return bool(self._choices) and all(state.finished for state in self._choices.values())

    def feed(self, response: types.GenerateContentResponse) -> list[CompletionChunk]:
        if response.usage_metadata is not None:  # a running total: the last one counts
            self._usage = response.usage_metadata
        candidates = response.candidates or []
        if not candidates and _prompt_blocked(response):
            return self._events(0, [], _FILTERED)
        return [
            chunk
            for position, candidate in enumerate(candidates)
            for chunk in self._candidate(_index(candidate, position), candidate)
        ]

    def finish(self) -> list[CompletionChunk]:
        return [self._chunk([], usage(self._usage))] if self._include_usage else []

    def _candidate(self, index: int, candidate: types.Candidate) -> list[CompletionChunk]:
        state = self._choices.setdefault(index, _ChoiceState())
        deltas: list[ChoiceDelta] = []
        for part in _answer_parts(candidate):
            if part.text:
                deltas.append({"content": part.text})
            if part.function_call:
                deltas.extend(_tool_call_deltas(state.tool_calls, tool_call(part)))
                state.tool_calls += 1
        reason = finish_reason(candidate.finish_reason, state.tool_calls > 0)
        return self._events(index, deltas, reason)

    def _events(
        self, index: int, deltas: list[ChoiceDelta], reason: FinishReason | None
    ) -> list[CompletionChunk]:
        state = self._choices.setdefault(index, _ChoiceState())
        if not state.started and (deltas or reason):
            state.started = True
            deltas = _with_role(deltas)
        choices: list[ChunkChoice] = [
            {"index": index, "delta": delta, "finish_reason": None} for delta in deltas
        ]
        if reason is not None:
            state.finished = True
            choices.append({"index": index, "delta": {}, "finish_reason": reason})
        return [self._chunk([choice]) for choice in choices]

    def _chunk(self, choices: list[ChunkChoice], totals: Usage | None = None) -> CompletionChunk:
        chunk: CompletionChunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self._include_usage:  # as OpenAI does: null on every chunk but the last
            chunk["usage"] = totals
        return chunk


def _with_role(deltas: list[ChoiceDelta]) -> list[ChoiceDelta]:
    """A choice's first delta carries the role, as OpenAI's does."""
    first: ChoiceDelta = {"role": "assistant", **(deltas[0] if deltas else {"content": ""})}
    return [first, *deltas[1:]]


def _tool_call_deltas(index: int, call: dict[str, Any]) -> list[ChoiceDelta]:
    """OpenAI's shape: id, type and name on the first fragment, the arguments after."""
    function = call["function"]
    head = {**call, "index": index, "function": {"name": function["name"], "arguments": ""}}
    tail = {"index": index, "function": {"arguments": function["arguments"]}}
    return [{"tool_calls": [head]}, {"tool_calls": [tail]}]


def model_list(models: Iterable[types.Model]) -> dict[str, Any]:
    """OpenAI's model list: the models that can chat, by their bare names."""
    return {
        "object": "list",
        "data": [
            {
                "id": (model.name or "").removeprefix("models/"),
                "object": "model",
                "created": 0,
                "owned_by": "google",
            }
            for model in models
            if model.name and "generateContent" in (model.supported_actions or ["generateContent"])
        ],
    }
