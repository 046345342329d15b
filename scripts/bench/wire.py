"""A lean HTTP/1.1 client for the load generator: one keep-alive connection, one request at a time.

The load generator shares the machine's two cores with Engram, PostgreSQL and
the fake upstream, so every millisecond it spends per request is taken from
what it measures. httpx cost it ~1.1 ms of CPU per request (its connection
pool, anyio's timeouts per read, h11); this client writes the request bytes
and parses the answer with httptools (uvicorn's C parser, installed with it),
a few hundred microseconds (scripts/BENCHMARKS.md, experiments). It knows only
what the benchmark sends: POST with a body, over plain TCP to loopback.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools


class WireError(Exception):
    """The connection broke or the answer was not HTTP."""


HEAD_BYTES = 512


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    first_byte_at: float | None  # perf_counter() when the first body byte arrived
    ended_at: float
    tail: bytes  # the body's last 32 bytes
    head: bytes  # its first HEAD_BYTES: an error answer's body, whole


@dataclass
class _Reading:
    """What the parser has seen of the answer in flight."""

    done: asyncio.Future[None]
    headers: dict[str, str] = field(default_factory=dict)
    first_byte_at: float | None = None
    tail: bytes = b""
    head: bytes = b""
    keep_alive: bool = True

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.perf_counter()
        self.tail = (self.tail + body)[-32:]
        if len(self.head) < HEAD_BYTES:
            self.head += body[: HEAD_BYTES - len(self.head)]

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reading: _Reading | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.parser is None or self.reading is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(WireError(f"bad answer: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(WireError("connection closed"))

    def _fail(self, error: Exception) -> None:
        if self.reading is not None and not self.reading.done.done():
            self.reading.done.set_exception(error)


class Connection:
    """One keep-alive connection to `url`'s host; reconnects when the server closed it."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"plain http URLs only: {url}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        self._protocol: _Protocol | None = None

    async def _connected(self) -> _Protocol:
        if self._protocol is None or self._protocol.closed:
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
            self._protocol = protocol
        return self._protocol

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        protocol = await self._connected()
        reading = _Reading(asyncio.get_running_loop().create_future())
        protocol.reading = reading
        protocol.parser = httptools.HttpResponseParser(reading)
        fields = {"content-type": "application/json", **headers}  # the caller's wins
        head = [
            f"POST {path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in fields.items()),
        ]
        assert protocol.transport is not None
        protocol.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        try:
            async with asyncio.timeout(self.timeout):
                await reading.done
        except BaseException:
            await self.aclose()  # an answer half read cannot share the connection
            raise
        if not protocol.parser.should_keep_alive():
            await self.aclose()
        return Answer(
            protocol.parser.get_status_code(),
            reading.headers,
            reading.first_byte_at,
            time.perf_counter(),
            reading.tail,
            reading.head,
        )

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
