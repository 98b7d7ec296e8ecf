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

The bound is only as good as the range of priorities: the API accepts |priority| <= P
(`--max-abs-priority`, checked in proto_convert.py), so no request waits more than about
2 * P * aging_s behind later work; an int32 priority of -2**31 would outrank 0 for ~680 years.

Which request is admitted next (`next_request`) depends on the policy (`--scheduling-policy`):

- `priority` (default): the queue's head by that key fixes a priority level; the candidates are
  the requests of that level queued before any request of another level (the queue's leading run
  of that level), so aging between levels is exactly as above. Among them the tenant with the
  smallest fair share (fair_share.py) goes first, with its earliest request; equal shares go in
  key order. A tenant flooding the queue therefore alternates with the others instead of pushing
  them behind its whole backlog.
- `sjf`: the same candidates, shortest remaining work first, aged: the key is
  arrival / aging_s + remaining work / max_model_len, so a job of a whole context length counts as
  one level of waiting, and a long job is overtaken only by work that arrived less than
  aging_s * (its extra work / max_model_len) seconds after it: it never starves.
- `fcfs`: arrival order (`add_request` order) alone; priorities and tenants are ignored.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator

from scheduler_svc.request import Request

SCHEDULING_POLICIES = ("priority", "sjf", "fcfs")


def scheduling_key(request: Request, aging_s: float) -> tuple[float, int]:
    """Sort key of `request`: smaller runs first. `aging_s = inf` means strict priorities."""
    aged = 0.0 if math.isinf(aging_s) else request.arrival_time / aging_s
    return (request.priority + aged, request.sequence_number)


def fcfs_key(request: Request) -> tuple[float, int]:
    return (0.0, request.sequence_number)


def remaining_work(request: Request) -> int:
    """Tokens `request` still has to compute (prompt, or what a preemption lost) plus the most it
    may still generate."""
    num_to_compute = request.num_tokens - request.num_computed_tokens
    return num_to_compute + request.sampling_params.max_tokens - request.num_output_tokens


def sjf_key(request: Request, aging_s: float, max_model_len: int) -> tuple[float, int]:
    """Shortest remaining work first, aged like priorities (see the module docstring)."""
    aged = 0.0 if math.isinf(aging_s) else request.arrival_time / aging_s
    return (aged + remaining_work(request) / max_model_len, request.sequence_number)


class RequestQueue:
    """A list of requests kept sorted by `scheduling_key` (by arrival under `fcfs`), indexed by
    priority level and by (level, tenant) for `next_request`."""

    def __init__(self, aging_s: float, policy: str = "priority", max_model_len: int = 1) -> None:
        if not aging_s > 0:
            raise ValueError(f"aging_s must be > 0 (inf: no aging), got {aging_s!r}")
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")
        self.aging_s = aging_s
        self.policy = policy
        self.max_model_len = max_model_len
        self._requests: list[Request] = []
        self._by_level: dict[int, list[Request]] = {}
        self._by_tenant: dict[int, dict[str, list[Request]]] = {}  # level -> tenant -> requests

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __getitem__(self, index: int) -> Request:
        return self._requests[index]

    def key(self, request: Request) -> tuple[float, int]:
        """The queue's order (also the running list's, whose last entry is the memory victim)."""
        if self.policy == "fcfs":
            return fcfs_key(request)
        return scheduling_key(request, self.aging_s)

    def add(self, request: Request) -> None:
        bisect.insort(self._requests, request, key=self.key)
        bisect.insort(self._by_level.setdefault(request.priority, []), request, key=self.key)
        tenants = self._by_tenant.setdefault(request.priority, {})
        bisect.insort(tenants.setdefault(request.tenant, []), request, key=self.key)

    def pop_first(self) -> Request:
        request = self._requests[0]
        self.remove(request)
        return request

    def remove(self, request: Request) -> None:
        self._requests.remove(request)
        _remove(self._by_level, request.priority, request)
        tenants = self._by_tenant[request.priority]
        _remove(tenants, request.tenant, request)
        if not tenants:
            del self._by_tenant[request.priority]

    def next_request(self, share: Callable[[str], float] = lambda tenant: 0.0) -> Request | None:
        """The request the policy admits next (None if empty); `share(tenant)` is the tenant's
        current fair share, smaller first (fair_share.TenantUsage.share)."""
        if not self._requests:
            return None
        head = self._requests[0]
        if self.policy == "fcfs":
            return head
        if self.policy == "sjf":
            return min(self._leading_run(head.priority), key=self._sjf_key)
        return self._fair_share_pick(head.priority, share)

    def _leading_run(self, level: int) -> Iterator[Request]:
        for request in self._requests:
            if request.priority != level:
                return
            yield request

    def _fair_share_pick(self, level: int, share: Callable[[str], float]) -> Request:
        # The leading run of `level` is what sorts before every other level's first request.
        bound = min((self.key(q[0]) for p, q in self._by_level.items() if p != level), default=None)
        firsts = [q[0] for q in self._by_tenant[level].values()]
        candidates = [r for r in firsts if bound is None or self.key(r) < bound]
        return min(candidates, key=lambda r: (share(r.tenant), self.key(r)))

    def _sjf_key(self, request: Request) -> tuple[float, int]:
        return sjf_key(request, self.aging_s, self.max_model_len)


def _remove(index: dict, slot: int | str, request: Request) -> None:
    requests = index[slot]
    requests.remove(request)
    if not requests:
        del index[slot]  # keeps the per-level scans to the levels and tenants present
