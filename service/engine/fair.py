"""Sharing one replica between tenants by weight (no torch here).

Waiting jobs queue per tenant; the next one admitted is from the tenant that has received
the least service for its weight: a weighted virtual token counter (VTC, Sheng et al.,
"Fairness in Serving Large Language Models", OSDI 2024). Each tenant's counter grows by the
tokens the engine computes for it (its prompts' uncached tokens when admitted, one per
decode step of each of its rows) divided by its weight. Counting tokens rather than requests
is what makes a tenant of long prompts and long replies pay for them; a tenant that returns
after idling starts at the least counter among the active ones, so idling banks no credit
(with deficit round robin a returning tenant's saved quantum would let it burst, and its
quantum would have to be guessed in requests). With one tenant the order is its own: first
its interactive jobs, then its batch ones, each first come first served (preempted jobs go
back to the front).

The running batch is shared the same way: `share` gives each active tenant's slice of the
running slots by weight, so the scheduler can preempt a job of the tenant most over its
slice when another tenant below its slice waits with no slot free.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

from service.engine.job import BATCH, ChatJob


class _Waiting(Protocol):
    stream: object  # .job: ChatJob


def _job(q: _Waiting) -> ChatJob:
    return q.stream.job


class FairQueue:
    """The engine's waiting jobs, taken in fair order (see the module's docstring)."""

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self.counters: dict[str, float] = {}
        self._queues: dict[str, tuple[deque, deque]] = {}  # tenant -> (interactive, batch)
        self._running: dict[str, int] = {}  # jobs each tenant has in the running batch
        self._arrival = 0
        self._order: dict[int, int] = {}  # id(queued) -> arrival number, for ties

    # the waiting jobs ----------------------------------------------------------------------
    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def push(self, q: _Waiting, front: bool = False) -> None:
        """A job joins its tenant's queue (at the front of its priority when coming back from
        preemption). A tenant with nothing waiting or running starts at the least counter of
        the active tenants."""
        job = _job(q)
        tenant = job.tenant
        if not self._active(tenant):
            floor = min((self.counters.get(t, 0.0) for t in self._active_tenants()),
                        default=None)
            if floor is not None:
                self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
            else:
                self.counters.setdefault(tenant, 0.0)
        queues = self._queues.setdefault(tenant, (deque(), deque()))
        lane = queues[1] if job.priority == BATCH else queues[0]
        self._arrival += 1
        self._order[id(q)] = -self._arrival if front else self._arrival
        (lane.appendleft if front else lane.append)(q)

    def peek(self) -> _Waiting | None:
        """The job admission should try next: the head of the waiting tenant with the least
        counter (ties: fewer running, then the earlier arrival)."""
        best, key = None, None
        for tenant, (inter, batch) in self._queues.items():
            head = inter[0] if inter else batch[0] if batch else None
            if head is None:
                continue
            k = (self.counters.get(tenant, 0.0), self._running.get(tenant, 0),
                 self._order.get(id(head), 0))
            if key is None or k < key:
                best, key = head, k
        return best

    def remove(self, q: _Waiting) -> None:
        """Take `q` (normally what peek returned) out of the queue."""
        for lane in self._queues[_job(q).tenant]:
            for i, item in enumerate(lane):
                if item is q:  # by identity: a queued job holds tensors
                    del lane[i]
                    self._order.pop(id(q), None)
                    return
        raise ValueError("not waiting")

    def __len__(self) -> int:
        return sum(len(a) + len(b) for a, b in self._queues.values())

    def __bool__(self) -> bool:
        return any(a or b for a, b in self._queues.values())

    def waiting(self, tenant: str) -> int:
        inter, batch = self._queues.get(tenant, ((), ()))
        return len(inter) + len(batch)

    # service and the running batch ---------------------------------------------------------
    def charge(self, tenant: str, tokens: int) -> None:
        """`tokens` computed for `tenant` (prompt tokens at admission, decode tokens)."""
        if tokens > 0:
            self.counters[tenant] = self.counters.get(tenant, 0.0) + tokens / self.weight(tenant)

    def started(self, tenant: str) -> None:
        self._running[tenant] = self._running.get(tenant, 0) + 1

    def stopped(self, tenant: str) -> None:
        n = self._running.get(tenant, 0) - 1
        if n > 0:
            self._running[tenant] = n
        else:
            self._running.pop(tenant, None)

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    def share(self, tenant: str, slots: int) -> float:
        """The running slots `tenant` is due among the tenants active now (those waiting or
        running, `tenant` counted as active), by weight."""
        active = self._active_tenants() | {tenant}
        return slots * self.weight(tenant) / sum(self.weight(t) for t in active)

    def over_share(self, slots: int) -> list[tuple[float, str]]:
        """Running tenants by how far over their share of `slots` they are, most first:
        (running / share, tenant)."""
        out = [(n / self.share(t, slots), t) for t, n in self._running.items() if n]
        return sorted(out, reverse=True)

    def _active(self, tenant: str) -> bool:
        return self.waiting(tenant) > 0 or self._running.get(tenant, 0) > 0

    def _active_tenants(self) -> set[str]:
        return set(self._running) | {t for t, (a, b) in self._queues.items() if a or b}
