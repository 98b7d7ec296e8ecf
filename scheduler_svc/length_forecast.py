"""How long a request will grow: the forecast lifetime-aware admission admits against.

A request may generate up to `max_tokens` tokens, but most stop earlier. Admitting against
`max_tokens` wastes the pool; admitting against the next step's blocks alone (immediate admission)
lets in work the pool cannot carry to the end, and preemption pays for it. The forecast sits in
between: the output length of a request is expected to be `ratio * max_tokens`, where `ratio` is
a quantile (default 0.5, the median; higher is more cautious) of `output tokens / max_tokens` over
the last `window` requests that finished (stopped or reached their length; aborted ones say nothing about lengths). The
denominator is what the request could have generated at most, `max_tokens` capped by the context
(`max_model_len` - prompt). Until `min_samples` requests have finished the ratio is 1: the whole
`max_tokens`, the one forecast that never under-estimates.

The quantile is conditional on what a request has already generated: one that has produced the
fraction g of its maximum is forecast from the observed ratios above g only. With long-tailed
lengths most requests are forecast short at admission, and one that outlives the short ones is
forecast from the long ones, as it should be. With fewer than `min_samples` ratios above g (a
request longer than nearly all seen) the forecast is its whole maximum. Either way a running
request is forecast at least one more token than it has. A request's K/V never holds its last
token (sampled, not fed back), so a lifetime of T tokens takes the blocks of T - 1.

Each request's forecast at its first admission is kept until it finishes, and `on_outcome`
(the app sets it to the metrics) is told the forecast and the actual length: how good the
forecasts are shows whether lifetime admission is worth its caution.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler_svc.request import Request, RequestStatus

ForecastOutcome = Callable[[int, int], None]  # (forecast total tokens, actual total tokens)


@dataclass(slots=True)
class LengthForecast:
    """A running quantile of observed output lengths relative to their maximum; see the module
    docstring."""

    max_model_len: int
    quantile: float = 0.5
    window: int = 256
    min_samples: int = 8
    on_outcome: ForecastOutcome | None = None
    _recent: deque[float] = field(default_factory=deque)  # the window, oldest first
    _sorted: list[float] = field(default_factory=list)  # the same ratios, sorted
    _admitted: dict[str, int] = field(default_factory=dict)  # req_id -> forecast at first admission

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile!r}")
        for name in ("max_model_len", "window", "min_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def ratio(self, generated: float = 0.0) -> float:
        """Expected output length over the most a request may generate, for one that has generated
        the fraction `generated` of it and goes on: the quantile of the observed ratios beyond
        `generated` (1 while fewer than `min_samples` are)."""
        first = bisect.bisect_right(self._sorted, generated)  # the ratios beyond `generated`
        num_reached = len(self._sorted) - first
        if num_reached < self.min_samples:
            return 1.0
        rank = math.ceil(self.quantile * num_reached)  # nearest rank: an observed ratio
        return self._sorted[first + rank - 1]

    def max_output_tokens(self, request: Request) -> int:
        """The most `request` may generate: `max_tokens`, capped by the context (a prompt that
        fills the context still samples one token)."""
        return max(min(request.sampling_params.max_tokens, self.max_model_len - request.num_prompt_tokens), 1)

    def total_tokens(self, request: Request) -> int:
        """Prompt plus the output `request` is expected to reach: more than it has, since only
        ratios beyond what it generated count, and at most `max_output_tokens`."""
        most = self.max_output_tokens(request)
        ratio = self.ratio(request.num_output_tokens / most)
        return request.num_prompt_tokens + min(math.ceil(ratio * most), most)

    def num_kv_tokens(self, request: Request) -> int:
        """Tokens whose K/V `request` is expected to hold at its end (all but the last)."""
        return self.total_tokens(request) - 1

    def admitted(self, request: Request) -> None:
        """`request` was admitted; its first admission's forecast is what its outcome is judged by."""
        self._admitted.setdefault(request.req_id, self.total_tokens(request))

    def finished(self, request: Request, status: RequestStatus) -> None:
        """`request` finished with `status`: learn from its length, unless it was aborted."""
        forecast = self._admitted.pop(request.req_id, None)
        if status == RequestStatus.FINISHED_ABORTED:
            return
        self._observe(request.num_output_tokens / self.max_output_tokens(request))
        if forecast is not None and self.on_outcome is not None:
            self.on_outcome(forecast, request.num_tokens)

    def _observe(self, ratio: float) -> None:
        if len(self._recent) == self.window:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._recent.popleft()))
        self._recent.append(ratio)
        bisect.insort(self._sorted, ratio)
