"""A pooled upstream connection that the provider closed as Engram reused it."""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from tests.conftest import Engram

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi."}}],
}
STREAM = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n".encode()


class _ClosesKeptConnections(socketserver.StreamRequestHandler):
    """Answers the first request of each connection and keeps it open; then closes it
    when the next request comes, unanswered: the end of a provider's keep-alive timer
    meeting a request (uvicorn's and Node's close idle connections after 5 s)."""

    def handle(self) -> None:
        served: list[int] = self.server.served  # type: ignore[attr-defined]
        for answered in range(2):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            body = self.rfile.read(length)
            if answered:
                if self.server.resets:  # type: ignore[attr-defined]
                    # Closed with unread data: the kernel answers with a reset,
                    # which Engram reads as "connection reset by peer".
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                return  # closed with the request unread by any application
            served.append(1)
            streamed = json.loads(body).get("stream")
            kind, answer = (
                ("text/event-stream", STREAM) if streamed else ("application/json", COMPLETION)
            )
            self.wfile.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\n".encode()
                + f"content-length: {len(answer)}\r\nconnection: keep-alive\r\n\r\n".encode()
                + answer
            )
            self.wfile.flush()


@pytest.fixture(params=["closes", "resets"])
def closing_upstream(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[int]]]:
    """Its base URL, and a list that grows by one per answered request; it closes
    the connections it drops, or resets them."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ClosesKeptConnections)
    server.daemon_threads = True
    server.served = []  # type: ignore[attr-defined]
    server.resets = request.param == "resets"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.served  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_on_a_connection_the_provider_closed_goes_out_again(
    closing_upstream: tuple[str, list[int]],
    start_engram: Callable[..., AbstractContextManager[Engram]],
) -> None:
    url, served = closing_upstream
    with start_engram(openai_base_url=url, extraction="off") as engram:
        user = engram.create_user()
        with engram.client(user) as client:  # no retries of its own
            answers = [
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}]
                )
                .choices[0]
                .message.content
                for _ in range(3)
            ]
            for _ in range(3):
                streamed = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}], stream=True
                )
                answers.append("".join(chunk.choices[0].delta.content or "" for chunk in streamed))
    assert answers == ["Hi."] * 6
    assert len(served) == 6


def test_a_request_goes_out_again_on_a_new_connection_when_every_kept_one_was_closed(
    closing_upstream: tuple[str, list[int]],
    start_engram: Callable[..., AbstractContextManager[Engram]],
) -> None:
    url, served = closing_upstream
    with start_engram(openai_base_url=url, extraction="off") as engram:
        user = engram.create_user()

        async def ask(count: int) -> list[str | None]:
            async with engram.async_client(user) as client:  # no retries of its own
                answers = await asyncio.gather(
                    *(
                        client.chat.completions.create(
                            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}]
                        )
                        for _ in range(count)
                    )
                )
            return [answer.choices[0].message.content for answer in answers]

        # Four calls at once leave Engram four kept connections, which the
        # provider then closes together (its keep-alive timer, started together):
        # a call sent again on another kept connection would meet a closed one.
        together = asyncio.run(ask(4))
        after = [asyncio.run(ask(1))[0] for _ in range(2)]
    assert together + after == ["Hi."] * 6
    assert len(served) == 6
