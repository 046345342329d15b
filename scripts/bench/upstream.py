"""The fake OpenAI upstream with a fixed first-token delay and token rate, as its own process.

`python -m scripts.bench.upstream --port P --first-token-delay S --token-interval S`.
tests/fakes/openai_server.py's own `__main__` prints every request it gets, which
would cost the upstream more than the benchmark measures; this one stays quiet and
forgets each request once answered, so its memory stays flat over a long run.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from tests.fakes.openai_server import FakeOpenAI

_REPLY = "Sure here is a short answer that streams back one word at a time so the"


def reply_of(words: int) -> str:
    vocabulary = _REPLY.split()
    return " ".join(vocabulary[index % len(vocabulary)] for index in range(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-token-delay", type=float, default=0.05)
    parser.add_argument("--token-interval", type=float, default=0.002)
    parser.add_argument("--reply-words", type=int, default=16)
    args = parser.parse_args()
    fake = FakeOpenAI(reply_of(args.reply_words), args.first_token_delay, args.token_interval)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await fake.app(scope, receive, send)
        if scope["type"] == "http":
            fake.received.clear()
            fake.extraction_received.clear()

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
