"""Requests ordered by priority with aging, first come first served within a priority.

A request's effective priority improves linearly with the time it has waited: one priority level
per `aging_s` seconds. Comparing two requests at any moment,

    priority_a - (now - arrival_a) / aging_s  <  priority_b - (now - arrival_b) / aging_s
    <=>  priority_a + arrival_a / aging_s  <  priority_b + arrival_b / aging_s,

so the order does not depend on `now`: each request gets a fixed sort key when it is queued, and
the queue stays sorted by insertion alone. A low-priority request is thus overtaken only by work
that arrived less than (its priority - theirs) * aging_s seconds after it: a stream of
high-priority arrivals delays it by a bounded time, never forever. Ties go to the earlier
`add_request` (a sequence number), which makes the order within one priority FCFS.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from scheduler_svc.request import Request


def scheduling_key(request: Request, aging_s: float) -> tuple[float, int]:
    """Sort key of `request`: smaller runs first. `aging_s = inf` means strict priorities."""
    aged = 0.0 if math.isinf(aging_s) else request.arrival_time / aging_s
    return (request.priority + aged, request.sequence_number)


class RequestQueue:
    """A list of requests kept sorted by `scheduling_key`."""

    def __init__(self, aging_s: float) -> None:
        if not aging_s > 0:
            raise ValueError(f"aging_s must be > 0 (inf: no aging), got {aging_s!r}")
        self.aging_s = aging_s
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __getitem__(self, index: int) -> Request:
        return self._requests[index]

    def add(self, request: Request) -> None:
        bisect.insort(self._requests, request, key=self._key)

    def pop_first(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def _key(self, request: Request) -> tuple[float, int]:
        return scheduling_key(request, self.aging_s)
