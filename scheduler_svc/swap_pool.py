"""Which blocks of the worker's CPU swap space hold which swapped-out request.

The scheduler decides; the worker only copies the pairs a plan names (worker_svc/swap_space.py).
"""

from __future__ import annotations


class SwapPool:
    """`num_blocks` swap blocks; a swapped-out request holds one per device block it had."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}

    @property
    def num_requests(self) -> int:
        """Requests swapped out (each holds its swap blocks until it resumes or ends)."""
        return len(self._tables)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_hold(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, req_id: str, num_blocks: int) -> list[int]:
        if req_id in self._tables:
            raise RuntimeError(f"request {req_id!r} is already swapped out")
        if not self.can_hold(num_blocks):
            raise RuntimeError(f"{num_blocks} swap blocks requested, {len(self._free)} free")
        table = [self._free.pop() for _ in range(num_blocks)]
        self._tables[req_id] = table
        return table

    def free(self, req_id: str) -> list[int]:
        """Release a request's swap blocks; returns them (in block-table order)."""
        table = self._tables.pop(req_id)
        self._free.extend(reversed(table))
        return table
