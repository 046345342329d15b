"""Is the database there? Full mode while it answers, degraded (passthrough) while it does not.

A call that cannot connect or times out marks the database down; a query error
from a reachable database does not (it fails closed instead). A probe in the
background, and the next call that succeeds, bring full mode back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from proxy.db.pool import is_outage
from proxy.errors import database_unavailable

log = structlog.get_logger("engram.health")

T = TypeVar("T")


class DatabaseHealth:
    def __init__(self, probe: Callable[[], Awaitable[object]], interval: float = 1.0) -> None:
        self._probe = probe
        self.interval = interval
        self.down_since: float | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def mark_down(self, error: BaseException) -> None:
        if self.up:
            self.down_since = time.monotonic()
            log.warning("database_down", error_class=type(error).__name__)

    def mark_up(self) -> None:
        if self.down_since is not None:
            log.info("database_up", down_s=round(time.monotonic() - self.down_since, 3))
            self.down_since = None

    def require_up(self) -> None:
        """503 with Retry-After at once, rather than waiting on a database that is away."""
        if not self.up:
            raise database_unavailable()

    async def guard(self, operation: Callable[[], Awaitable[T]], budget_seconds: float) -> T:
        """Run a database call; an outage or a timeout marks the database down and is a 503."""
        self.require_up()
        try:
            result = await asyncio.wait_for(operation(), budget_seconds)
        except Exception as error:
            if is_outage(error):
                self.mark_down(error)
                raise database_unavailable() from error
            raise
        return result

    async def run_probe(self) -> None:
        """Forever: while down, check every `interval` whether the database answers again."""
        while True:
            await asyncio.sleep(self.interval)
            if self.up:
                continue
            try:
                await asyncio.wait_for(self._probe(), self.interval)
            except Exception:  # still down; the next probe tries again  # noqa: S112
                continue
            self.mark_up()
