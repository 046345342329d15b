"""The HTTP client Engram calls providers with: several small connection pools."""

from __future__ import annotations

import itertools

import httpx

from proxy.settings import Settings

# httpcore's connection pool does work in proportion to its connections and
# waiting requests on every request and response, under one lock: with 64
# calls in flight through one pool, the upstream's first byte took 318 ms as
# seen from Engram against 90 ms called directly (scripts/BENCHMARKS.md).
# Requests take the pools in turn, so each pool stays small.
POOLS = 8
CONNECTIONS_PER_POOL = 64
IDLE_CONNECTIONS_PER_POOL = 16


class PooledTransport(httpx.AsyncBaseTransport):
    """Hands each request to the next of several connection pools, in turn."""

    def __init__(self, pools: int, limits: httpx.Limits) -> None:
        self._transports = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(pools)]
        self._turns = itertools.cycle(self._transports)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._turns).handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_read_timeout,
        pool=settings.upstream_connect_timeout,
    )
    limits = httpx.Limits(
        max_connections=CONNECTIONS_PER_POOL, max_keepalive_connections=IDLE_CONNECTIONS_PER_POOL
    )
    transport = PooledTransport(POOLS, limits)
    return httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False)
