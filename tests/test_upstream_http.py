"""The upstream HTTP client: httpx's API over aiohttp's connections, under load and failure."""

from __future__ import annotations

import asyncio
import dataclasses

import anyio
import httpx
import pytest

from proxy.settings import Settings
from proxy.upstream_http import upstream_client
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.anyio


async def test_concurrent_calls_all_succeed_over_reused_connections(
    upstream: FakeOpenAI, base_settings: Settings
) -> None:
    url = f"{upstream.url}/v1/models"  # type: ignore[attr-defined]
    async with upstream_client(base_settings) as client:
        for _ in range(3):
            answers = await asyncio.gather(*(client.get(url) for _ in range(64)))
            assert [answer.status_code for answer in answers] == [200] * 64
        connector = client._transport.pooled.client.connector  # type: ignore[attr-defined]
        # Kept alive and reused: at most one connection per call in flight, not per call.
        assert 1 <= sum(len(idle) for idle in connector._conns.values()) <= 64


async def test_a_refused_connection_is_a_connect_failure(base_settings: Settings) -> None:
    async with upstream_client(base_settings) as client:
        # httpx-aiohttp reports a refused connection as ConnectTimeout; to
        # providers.errors both mean the provider is unreachable.
        with pytest.raises((httpx.ConnectError, httpx.ConnectTimeout)):
            await client.get("http://127.0.0.1:9/v1/models")  # discard port: nothing listens


async def test_a_silent_upstream_is_a_read_timeout(base_settings: Settings) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):  # never answers; until the client hangs up
            pass
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = dataclasses.replace(base_settings, upstream_read_timeout=0.3)
    try:
        async with upstream_client(settings) as client:
            with anyio.fail_after(5), pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{port}/v1/models")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
    base_settings: Settings,
) -> None:
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # as a server's idle timeout does, without a Connection: close
        await writer.wait_closed()

    server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with upstream_client(base_settings) as client:
            for _ in range(3):
                answer = await client.get(f"http://127.0.0.1:{port}/v1/models")
                assert answer.status_code == 200
                await asyncio.sleep(0.1)  # the close reaches the client while it is idle
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 3
