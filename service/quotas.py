"""Per-tenant quotas on one replica: requests in flight, and prompt + completion tokens over
the last 60 seconds. Checked when a call arrives, before any work; a refusal says which limit
and when a retry may pass (the call's grpc-retry-pushback-ms trailer and RetryInfo)."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from service.engine.job import Overloaded
from service.tenants import TenantPolicy

WINDOW_S = 60.0


class QuotaExceeded(Overloaded):
    """A tenant over one of its quotas: RESOURCE_EXHAUSTED, with the limit named and
    `retry_ms`, when a retry may pass."""

    def __init__(self, message: str, limit: str, retry_ms: int) -> None:
        super().__init__(message)
        self.limit, self.retry_ms = limit, retry_ms


class Quotas:
    """Each tenant's calls in flight and the tokens of its calls finished in the last minute
    (this replica's: a fleet's replicas count apart)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 in_flight_retry_ms: int = 1000) -> None:
        self.clock = clock
        self.in_flight_retry_ms = in_flight_retry_ms
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._used: dict[str, deque[tuple[float, int]]] = {}  # (when, tokens), oldest first
        self._sums: dict[str, int] = {}

    def admit(self, tenant: TenantPolicy) -> None:
        """Count a new call of `tenant`, or raise QuotaExceeded naming the limit it is at."""
        with self._lock:
            now = self.clock()
            self._expire(tenant.name, now)
            held = self._in_flight.get(tenant.name, 0)
            if tenant.max_in_flight and held >= tenant.max_in_flight:
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} has {held} requests in flight, its quota of "
                    f"{tenant.max_in_flight} (max_in_flight); retry when one has finished",
                    "max_in_flight", self.in_flight_retry_ms)
            used = self._sums.get(tenant.name, 0)
            if tenant.tokens_per_minute and used >= tenant.tokens_per_minute:
                wait = self._until_below(tenant.name, tenant.tokens_per_minute, now)
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} used {used:,} tokens in the last minute, its quota "
                    f"of {tenant.tokens_per_minute:,} (tokens_per_minute); retry in "
                    f"{wait / 1000:.1f} s", "tokens_per_minute", wait)
            self._in_flight[tenant.name] = held + 1

    def release(self, tenant: str, tokens: int = 0) -> None:
        """A call admitted by `admit` ended, having used `tokens` (prompt + completion)."""
        with self._lock:
            held = self._in_flight.get(tenant, 0) - 1
            if held > 0:
                self._in_flight[tenant] = held
            else:
                self._in_flight.pop(tenant, None)
            if tokens > 0:
                self._used.setdefault(tenant, deque()).append((self.clock(), tokens))
                self._sums[tenant] = self._sums.get(tenant, 0) + tokens

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)

    def tokens_last_minute(self, tenant: str) -> int:
        with self._lock:
            self._expire(tenant, self.clock())
            return self._sums.get(tenant, 0)

    def _expire(self, tenant: str, now: float) -> None:
        used = self._used.get(tenant)
        while used and used[0][0] <= now - WINDOW_S:
            _, tokens = used.popleft()
            self._sums[tenant] -= tokens

    def _until_below(self, tenant: str, limit: int, now: float) -> int:
        """Milliseconds until enough of the window's tokens expire for the sum to fall below
        `limit`."""
        total = self._sums.get(tenant, 0)
        for when, tokens in self._used.get(tenant, ()):
            total -= tokens
            if total < limit:
                return max(1, int((when + WINDOW_S - now) * 1000) + 1)
        return int(WINDOW_S * 1000)
