"""The embedded PostgreSQL's memory settings."""

from __future__ import annotations

import asyncpg
import pytest

from proxy.db.embedded import _ram_bytes, memory_settings

GB = 2**30


def test_shared_buffers_is_an_eighth_of_the_ram_between_128_mb_and_2_gb() -> None:
    assert memory_settings(512 * 2**20)["shared_buffers"] == "128MB"
    assert memory_settings(8 * GB)["shared_buffers"] == "1024MB"
    assert memory_settings(64 * GB)["shared_buffers"] == "2048MB"
    assert memory_settings(None) == {}  # RAM unknown: PostgreSQL's own defaults


@pytest.mark.anyio
async def test_the_embedded_server_runs_with_them(db: asyncpg.Connection) -> None:
    expected = memory_settings(_ram_bytes())
    for name, value in expected.items():
        # SHOW rounds to the unit it prefers (2048MB reads "2GB"): compare in bytes.
        shown = await db.fetchval("SELECT pg_size_bytes(current_setting($1))", name)
        assert shown == int(value.removesuffix("MB")) * 2**20, name
