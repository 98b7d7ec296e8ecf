"""Per victim: is it cheaper to swap its KV blocks out and back, or to recompute them later?

Recompute costs the victim's computed tokens at the rate the worker computes tokens (a moving
average of step time per scheduled token, over steps big enough to be prefill-dominated); swap
costs its blocks' bytes twice (out, then back in) at the copy rate the worker measured at start.
Both are estimates in seconds; the rule picks the smaller. Before any such step has been seen
the recompute rate is unknown and recompute is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PreemptionCost:
    kv_bytes_per_block: int
    swap_bytes_per_s: float
    min_step_tokens: int = 64  # smaller steps are decode-dominated: their per-token time misleads
    smoothing: float = 0.2
    seconds_per_token: float | None = None

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens < self.min_step_tokens or seconds <= 0:
            return
        rate = seconds / num_tokens
        previous = self.seconds_per_token
        self.seconds_per_token = rate if previous is None else previous + self.smoothing * (rate - previous)

    def recompute_s(self, num_computed_tokens: int) -> float | None:
        return None if self.seconds_per_token is None else num_computed_tokens * self.seconds_per_token

    def swap_s(self, num_blocks: int) -> float | None:
        if self.swap_bytes_per_s <= 0:
            return None
        return 2 * num_blocks * self.kv_bytes_per_block / self.swap_bytes_per_s

    def prefers_swap(self, num_computed_tokens: int, num_blocks: int) -> bool:
        recompute, swap = self.recompute_s(num_computed_tokens), self.swap_s(num_blocks)
        return recompute is not None and swap is not None and swap < recompute
