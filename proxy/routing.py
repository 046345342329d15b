"""Which provider answers a request: a model prefix, X-Engram-Provider, or the default."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from proxy.errors import BadRequest


def choose_provider(
    headers: Mapping[str, str], model: str, default: str, known: Collection[str]
) -> tuple[str, str]:
    """(provider name, model as the provider knows it).

    A model prefix naming a provider (`ollama/llama3.2`) selects it and is
    removed; other slashes (`meta-llama/Llama-3` on an OpenAI-compatible
    server) are part of the model's name.
    """
    named = headers.get("x-engram-provider", "").strip().lower()
    valid = ", ".join(sorted(known))
    if named and named not in known:
        raise BadRequest(
            f"unknown provider {named!r} in X-Engram-Provider; valid providers: {valid}",
            param="x-engram-provider",
            code="unknown_provider",
        )
    prefix, slash, rest = model.partition("/")
    if slash and prefix in known:
        if named and named != prefix:
            raise BadRequest(
                f"X-Engram-Provider says {named!r} but the model names {prefix!r}",
                param="model",
                code="provider_conflict",
            )
        if not rest:
            raise BadRequest(f"model: {model!r} names no model after the prefix", param="model")
        return prefix, rest
    return named or default, model
