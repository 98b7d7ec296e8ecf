"""How many times `omnibus serve` may restart a dead worker: at most N within a sliding window.

A worker that keeps dying (a bad GPU, a model that no longer loads) would otherwise be restarted
forever while clients wait; past the budget the server exits 1 and its own supervisor decides.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class RestartBudget:
    """At most `max_restarts` restarts in any `window_s` seconds."""

    max_restarts: int
    window_s: float = 600.0
    _restarts: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s!r}")

    def take(self, now: float | None = None) -> bool:
        """Spend one restart now; False (nothing spent) if the window's budget is used up."""
        now = time.monotonic() if now is None else now
        while self._restarts and now - self._restarts[0] >= self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True
