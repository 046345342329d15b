"""Engram API keys: `egm_<key_id>_<secret>`, made, split and checked.

The key id is public and finds the key's row; the secret is kept only as an
argon2id hash. Verification is deliberately slow, so it runs off the event loop
and its result is cached by auth.py.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

PREFIX = "egm"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32
_MAX_KEY_LENGTH = 128

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 defaults


@cache
def _decoy_hash() -> str:
    """Verified against when a key id is unknown, so that answer takes as long as a wrong one."""
    return _hasher.hash(secrets.token_urlsafe(_SECRET_BYTES))


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    secret: str = field(repr=False)

    @property
    def plaintext(self) -> str:
        return f"{PREFIX}_{self.key_id}_{self.secret}"


def generate() -> tuple[ApiKey, str]:
    """A new key and the argon2id hash of its secret, the only part that is stored."""
    key = ApiKey(secrets.token_hex(_KEY_ID_BYTES), secrets.token_urlsafe(_SECRET_BYTES))
    return key, _hasher.hash(key.secret)


def looks_like_engram_key(value: str) -> bool:
    return value.startswith(f"{PREFIX}_")


def parse(value: str) -> ApiKey | None:
    """Split a presented key; None when it cannot be an Engram key at all."""
    if len(value) > _MAX_KEY_LENGTH:
        return None
    parts = value.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    key_id, secret = parts[1], parts[2]
    if len(key_id) != 2 * _KEY_ID_BYTES or not all(c in "0123456789abcdef" for c in key_id):
        return None
    return ApiKey(key_id, secret)


def verify(secret_hash: str | None, secret: str) -> bool:
    """True when `secret` matches; runs the full argon2 cost even for unknown keys."""
    try:
        return _hasher.verify(secret_hash or _decoy_hash(), secret) and secret_hash is not None
    except (VerificationError, InvalidHashError):
        return False
