"""The HTTP client Engram calls providers with: httpx's API over aiohttp's connections."""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

from proxy.settings import Settings

# Every chat request makes one call here, and a streamed one reads each chunk
# through it: this client is on the hot path twice. httpx's own transport
# (httpcore, with an anyio timeout around every read) cost 1.5-1.8 ms of CPU per
# call and 2.8-3.0 ms per 16-chunk stream on this machine; aiohttp's, with its C
# parser, 0.6-0.7 and 1.2-1.3 (scripts/BENCHMARKS.md, experiments). Its pool
# also has none of the per-request work in proportion to open connections that
# made one httpcore pool take 318 ms to a first byte at 64 calls in flight.
MAX_CONNECTIONS = 512
KEEPALIVE_SECONDS = 30.0


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_read_timeout,
        pool=settings.upstream_connect_timeout,
    )
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_SECONDS)
    transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False)
