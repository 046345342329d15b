"""Errors raised by provider adapters, and the mapping from httpx's errors.

    ProviderError                 anything that went wrong talking to a provider
    ├── ProviderUnreachable       could not connect, or the connection broke
    ├── ProviderTimeout           connected, but no answer within the timeout
    ├── ProviderStatusError       the provider answered with an error status
    └── ProviderProtocolError     the provider answered with something unreadable

    UnsupportedParameter          (a ValueError) a request field the provider cannot
                                  honour; raised before anything is sent, a 400

Every error names the provider and the host it was talking to, never a key.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


class ProviderError(Exception):
    """Base class: `provider` is the adapter's name, `host` the upstream host."""

    def __init__(self, provider: str, host: str, message: str) -> None:
        super().__init__(message)
        self.provider = provider
        self.host = host
        self.message = message


class UnsupportedParameter(ValueError):
    """A request field a provider cannot honour; `param` names it as OpenAI's errors do.

    Each adapter subclasses it with its own wording; the proxy answers 400.
    """

    param: str


class ProviderUnreachable(ProviderError):
    pass


class ProviderTimeout(ProviderError):
    pass


class ProviderProtocolError(ProviderError):
    pass


class ProviderStatusError(ProviderError):
    """The upstream's own error answer, kept whole so it can be relayed unchanged."""

    def __init__(
        self,
        provider: str,
        host: str,
        status_code: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        super().__init__(provider, host, f"{provider} answered with status {status_code}")
        self.status_code = status_code
        self.body = body
        self.headers = headers


def _certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The TLS verification failure behind `error`, if that is what it is.

    httpx-aiohttp reports it as a ConnectTimeout caused by aiohttp's
    ClientConnectorCertificateError (itself an SSLCertVerificationError, without
    the details), caused by the ssl module's own: the deepest one is returned.
    """
    found: ssl.SSLCertVerificationError | None = None
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def _translate(error: httpx.HTTPError, provider: str, host: str) -> ProviderError:
    if (certificate := _certificate_error(error)) is not None:
        # Said apart from "unreachable": the fix is on the operator's side,
        # usually a provider behind a private certificate authority.
        reason = getattr(certificate, "verify_message", None) or "certificate verify failed"
        return ProviderUnreachable(
            provider,
            host,
            f"{provider} at {host} failed TLS certificate verification ({reason}); to trust "
            "a private certificate authority, point SSL_CERT_FILE at its certificates",
        )
    if isinstance(error, httpx.TimeoutException) and not isinstance(error, httpx.ConnectTimeout):
        return ProviderTimeout(provider, host, f"{provider} at {host} did not answer in time")
    if isinstance(error, httpx.TransportError):
        return ProviderUnreachable(provider, host, f"{provider} at {host} is unreachable")
    return ProviderProtocolError(provider, host, f"{provider} at {host} sent an unreadable answer")


@contextmanager
def map_httpx_errors(provider: str, host: str) -> Iterator[None]:
    """Turn httpx's exceptions raised inside the block into ProviderErrors.

    Works around awaits and around the iteration of a streamed body alike.
    """
    try:
        yield
    except httpx.HTTPError as error:
        raise _translate(error, provider, host) from error
