"""Who is calling: Engram key → user, argon2id verified once per key per cache TTL.

Verified keys live in a TTL cache keyed by their public key id. The cache holds
an HMAC of the key under a per-process secret, compared in constant time, never
the key itself. The TTL counts from the database fetch and is not extended by
use, so a key revoked elsewhere stops working within one TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from uuid import UUID

from cachetools import TTLCache

from proxy import keys
from proxy.db.users import KeyRecord, UserSettings
from proxy.errors import AuthenticationFailed, PermissionDenied

KeyFetcher = Callable[[str], Awaitable[KeyRecord | None]]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_id: UUID
    key_id: str
    settings: UserSettings


@dataclass(frozen=True)
class Credentials:
    """The keys a request carries: Engram's, and the provider's (BYOK) if any."""

    engram_key: str = field(repr=False)
    provider_key: str | None = field(default=None, repr=False)


def _bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def credentials_from_headers(headers: Mapping[str, str]) -> Credentials:
    """Split X-Engram-Key / Authorization into the Engram key and the provider key.

    `X-Engram-Key` carries the Engram key, and any other Authorization bearer
    is then the provider's (BYOK). Without it the bearer must be an `egm_` key,
    and the server's provider key (if any) will be used upstream.
    """
    bearer = _bearer(headers)
    engram_key = headers.get("x-engram-key", "").strip()
    if engram_key:
        if bearer is not None and not keys.looks_like_engram_key(bearer):
            return Credentials(engram_key, bearer)
        return Credentials(engram_key)
    if bearer is not None and keys.looks_like_engram_key(bearer):
        return Credentials(bearer)
    raise AuthenticationFailed(
        "missing Engram API key: send it in X-Engram-Key (or as Authorization: Bearer egm_… "
        "when the server holds the provider key)",
        code="missing_api_key",
    )


def check_user_header(headers: Mapping[str, str], principal: Principal) -> None:
    """X-Engram-User-ID, when sent, must name the key's own user."""
    claimed = headers.get("x-engram-user-id", "").strip()
    if claimed and claimed.lower() != str(principal.user_id):
        raise PermissionDenied("X-Engram-User-ID does not match the user of this API key")


async def authenticate_request(
    authenticator: Authenticator, headers: Mapping[str, str]
) -> tuple[Principal, Credentials]:
    """The caller of a request, and the provider key it brought (BYOK), if any."""
    credentials = credentials_from_headers(headers)
    principal = await authenticator.authenticate(credentials.engram_key)
    check_user_header(headers, principal)
    return principal, credentials


@dataclass(frozen=True)
class _CachedKey:
    digest: bytes
    principal: Principal


class Authenticator:
    """Checks Engram keys against the database, with a bounded TTL cache in front."""

    def __init__(self, fetch_key: KeyFetcher, ttl: float, max_size: int = 10_000) -> None:
        self._fetch_key = fetch_key
        self._cache: TTLCache[str, _CachedKey] = TTLCache(maxsize=max_size, ttl=ttl)
        self._hmac_secret = secrets.token_bytes(32)
        # One verification per key at a time; concurrent first requests share it.
        self._in_flight: dict[tuple[str, bytes], asyncio.Future[Principal]] = {}

    async def authenticate(self, presented: str) -> Principal:
        key = keys.parse(presented)
        if key is None:
            raise AuthenticationFailed("invalid Engram API key")
        digest = self._digest(key)
        cached = self._cache.get(key.key_id)
        if cached is not None:
            if hmac.compare_digest(cached.digest, digest):
                return cached.principal
            raise AuthenticationFailed("invalid Engram API key")
        return await self._verify_once(key, digest)

    def cached(self, presented: str) -> Principal | None:
        """The principal for a key verified within the TTL, without touching the database."""
        key = keys.parse(presented)
        cached = self._cache.get(key.key_id) if key else None
        if key is None or cached is None:
            return None
        return cached.principal if hmac.compare_digest(cached.digest, self._digest(key)) else None

    def evict(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    def _digest(self, key: keys.ApiKey) -> bytes:
        return hmac.new(self._hmac_secret, key.plaintext.encode(), hashlib.sha256).digest()

    async def _verify_once(self, key: keys.ApiKey, digest: bytes) -> Principal:
        slot = (key.key_id, digest)
        pending = self._in_flight.get(slot)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
        self._in_flight[slot] = future
        try:
            principal = await self._verify(key)
        except Exception as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(principal)
            self._cache[key.key_id] = _CachedKey(digest, principal)
            return principal
        finally:
            del self._in_flight[slot]

    async def _verify(self, key: keys.ApiKey) -> Principal:
        record = await self._fetch_key(key.key_id)
        secret_hash = record.secret_hash if record is not None else None
        valid = await asyncio.to_thread(keys.verify, secret_hash, key.secret)
        if record is None or not valid:
            raise AuthenticationFailed("invalid Engram API key")
        if record.revoked:
            raise AuthenticationFailed(
                "this Engram API key has been revoked", code="revoked_api_key"
            )
        return Principal(record.user_id, record.key_id, record.settings)
