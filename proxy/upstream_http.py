"""The HTTP client Engram calls providers with: httpx's API over aiohttp's connections."""

from __future__ import annotations

import http.cookiejar
import urllib.request

import aiohttp
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


class _RefuseCookies(http.cookiejar.DefaultCookiePolicy):
    """Neither keeps a cookie nor sends one."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: urllib.request.Request) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: urllib.request.Request) -> bool:
        return False


def no_cookies() -> http.cookiejar.CookieJar:
    """A cookie jar for a client that every user's requests share.

    An httpx client, and an aiohttp session, keep the cookies a server sets and
    send them with every later request to it: one user's upstream session
    cookie would go out with the next user's call.
    """
    # A CookieJar, not httpx.Cookies: httpx copies the cookies of one of its own
    # into a new jar of the default policy, and uses a CookieJar as it is.
    return http.cookiejar.CookieJar(policy=_RefuseCookies())


class _ResendOnClosedConnection(httpx.AsyncBaseTransport):
    """Sends a request again, once, on a new connection when the pooled one it went
    out on had been closed by the provider before any answer came.

    A provider closes an idle connection when its keep-alive timer ends (5 s for
    uvicorn, so vLLM, and for Node; aiohttp keeps connections 30 s and hands out
    the longest idle first): a request written just then is never read, and
    aiohttp says only that the server disconnected. Engram answered 502. (A
    provider that crashed while working on a request disconnects too: it gets the
    request once more, as from the OpenAI SDK, which retries such errors.)

    The second attempt goes through `fresh`, whose connections are never kept:
    the pool's other idle connections were opened by the same burst of calls,
    and their timers end together (sent again through the pool, a call met a
    second closed connection and got 502 after all).
    """

    def __init__(self, pooled: httpx.AsyncBaseTransport, fresh: httpx.AsyncBaseTransport) -> None:
        self.pooled = pooled
        self.fresh = fresh

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.pooled.handle_async_request(request)
        except httpx.TransportError as error:
            if not isinstance(error.__cause__, aiohttp.ServerDisconnectedError):
                raise
        return await self.fresh.handle_async_request(request)

    async def aclose(self) -> None:
        await self.pooled.aclose()
        await self.fresh.aclose()


def upstream_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_read_timeout,
        pool=settings.upstream_connect_timeout,
    )
    # certifi's authorities, or SSL_CERT_FILE / SSL_CERT_DIR's (a private CA).
    ssl_context = httpx.create_ssl_context()

    def session(keep_connections: bool) -> aiohttp.ClientSession:
        if keep_connections:
            connector = aiohttp.TCPConnector(
                limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS, ssl=ssl_context
            )
        else:
            connector = aiohttp.TCPConnector(
                limit=MAX_CONNECTIONS, force_close=True, ssl=ssl_context
            )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # HTTPS_PROXY, HTTP_PROXY and NO_PROXY, only when a proxy is set: aiohttp
            # then looks the proxy up in a thread for every request.
            trust_env=settings.egress_proxy,
        )

    # Sessions are made on first use, inside the event loop.
    pooled = AiohttpTransport(client=lambda: session(keep_connections=True))
    fresh = AiohttpTransport(client=lambda: session(keep_connections=False))
    return httpx.AsyncClient(
        timeout=timeout,
        transport=_ResendOnClosedConnection(pooled, fresh),
        follow_redirects=False,
        cookies=no_cookies(),
    )
