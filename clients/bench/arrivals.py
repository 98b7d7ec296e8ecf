"""When each request is sent: seeded offsets from the start of the benchmark."""

from __future__ import annotations

import math

import numpy as np

# A stream id mixed into the seed so arrival gaps are independent of the workload's draws,
# which use the same user-facing seed.
ARRIVAL_STREAM = 1


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each of n requests is sent; the first goes at 0.

    request_rate = inf sends everything at once. Otherwise the gaps are gamma-distributed with
    mean 1/request_rate and shape `burstiness` (as in vLLM's benchmark_serving): 1.0 is a
    Poisson process, below 1 burstier, above 1 more regular.
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError(f"request_rate and burstiness must be positive, got {request_rate}, {burstiness}")
    if math.isinf(request_rate) or n == 0:
        return [0.0] * n
    rng = np.random.default_rng((seed, ARRIVAL_STREAM))
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
