"""The key's user's API keys: another key, the list, and a revocation that holds at once."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Engram, User

pytestmark = pytest.mark.anyio


def chat_status(engram: Engram, key: str) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return engram.post(
        "/v1/chat/completions", None, body, headers={"X-Engram-Key": key}
    ).status_code


async def test_a_second_key_works_is_listed_without_secrets_and_is_stored_hashed(
    engram: Engram, db: asyncpg.Connection
) -> None:
    user = engram.create_user()
    created = engram.post("/keys", user, {"name": "laptop"})
    assert created.status_code == 201
    second = created.json()
    assert second["apiKey"].startswith(f"egm_{second['keyId']}_")
    assert chat_status(engram, second["apiKey"]) == 200

    listed = engram.get("/keys", user).json()["data"]
    assert {key["name"] for key in listed} == {"default", "laptop"}
    assert all(set(key) == {"key_id", "name", "created_at", "last_used_at", "revoked_at"}
               for key in listed)  # fmt: skip
    secret = second["apiKey"].split("_", 2)[2]
    assert secret not in engram.get("/keys", user).text
    stored = await db.fetchval(
        "SELECT secret_hash FROM api_keys WHERE key_id = $1", second["keyId"]
    )
    assert stored.startswith("$argon2id$")
    assert secret not in stored


def test_a_revoked_key_stops_at_once_though_it_was_cached(engram: Engram) -> None:
    user = engram.create_user()
    spare = engram.post("/keys", user, {"name": "spare"}).json()
    assert chat_status(engram, spare["apiKey"]) == 200  # verified, so now cached
    revoked = engram.request("DELETE", f"/keys/{spare['keyId']}", user)
    assert revoked.status_code == 200
    assert chat_status(engram, spare["apiKey"]) == 401
    assert chat_status(engram, user.api_key) == 200  # the user's other key is untouched
    listed = {key["key_id"]: key for key in engram.get("/keys", user).json()["data"]}
    assert listed[spare["keyId"]]["revoked_at"] is not None


def test_a_user_cannot_revoke_another_users_key(engram: Engram) -> None:
    owner, other = engram.create_user(), engram.create_user()
    owner_key_id = owner.api_key.split("_")[1]
    answer = engram.request("DELETE", f"/keys/{owner_key_id}", other)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert chat_status(engram, owner.api_key) == 200


def test_a_key_needs_a_name(engram: Engram) -> None:
    user: User = engram.create_user()
    answer = engram.post("/keys", user, {"name": ""})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "name"
