"""The upstream HTTP client: requests spread over several small connection pools."""

from __future__ import annotations

import asyncio

import pytest

from proxy.settings import Settings
from proxy.upstream_http import POOLS, PooledTransport, upstream_client
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.anyio


async def test_concurrent_requests_use_every_pool_and_all_succeed(
    upstream: FakeOpenAI, base_settings: Settings
) -> None:
    url = f"{upstream.url}/v1/models"  # type: ignore[attr-defined]
    async with upstream_client(base_settings) as client:
        transport = client._transport
        assert isinstance(transport, PooledTransport)
        answers = await asyncio.gather(*(client.get(url) for _ in range(4 * POOLS)))
        assert [answer.status_code for answer in answers] == [200] * (4 * POOLS)
        open_connections = [len(t._pool.connections) for t in transport._transports]
        assert all(count >= 1 for count in open_connections), open_connections
    # Leaving the client closes every pool.
    assert all(len(t._pool.connections) == 0 for t in transport._transports)
