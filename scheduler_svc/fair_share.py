"""Fair share between tenants: a decayed count of the tokens each tenant has been served.

Every token the scheduler schedules for a request (a prompt chunk or a decode) is charged to its
tenant. Charges decay by half every `half_life_steps` scheduler steps, so the count says who has
been served *recently*; dividing it by the tenant's weight gives the share the queue compares
(smaller goes first). The decay is counted in steps, not seconds: the order of the queue never
reads a clock, so a test can replay it exactly.

Counts are stored lazily as (value, step of the last update) and decayed when read, so a step
costs O(tenants it served), not O(tenants ever seen). Tenants with nothing left to decay are
forgotten (`prune`), which bounds memory by the tenants active in the last few half-lives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TENANT = ""  # requests without a tenant share this one


@dataclass(slots=True)
class _Usage:
    tokens: float
    step: int


@dataclass(slots=True)
class TenantUsage:
    """Decayed served tokens per tenant; see the module docstring."""

    half_life_steps: int = 1000
    weights: dict[str, float] = field(default_factory=dict)  # tenants not listed weigh 1
    _usage: dict[str, _Usage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.half_life_steps, int) or self.half_life_steps < 1:
            raise ValueError(f"half_life_steps must be a positive integer, got {self.half_life_steps!r}")
        check_weights(self.weights)

    def charge(self, tenant: str, num_tokens: int, step: int) -> None:
        """`tenant` was served `num_tokens` tokens in scheduler step `step`."""
        self._usage[tenant] = _Usage(self.tokens(tenant, step) + num_tokens, step)

    def tokens(self, tenant: str, step: int) -> float:
        """Tokens served to `tenant`, decayed to step `step`."""
        usage = self._usage.get(tenant)
        if usage is None:
            return 0.0
        return usage.tokens * 0.5 ** ((step - usage.step) / self.half_life_steps)

    def share(self, tenant: str, step: int) -> float:
        """What the queue compares: decayed tokens over the tenant's weight (smaller first)."""
        return self.tokens(tenant, step) / self.weights.get(tenant, 1.0)

    def prune(self, step: int, keep: set[str]) -> None:
        """Forget tenants outside `keep` whose count has decayed below one token."""
        for tenant in [t for t in self._usage if t not in keep and self.tokens(t, step) < 1.0]:
            del self._usage[tenant]

    @property
    def num_tenants(self) -> int:
        return len(self._usage)


def check_weights(weights: dict[str, float]) -> None:
    for tenant, weight in weights.items():
        if not isinstance(tenant, str):
            raise ValueError(f"tenant weights: tenant names must be strings, got {tenant!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight > 0
        ):
            raise ValueError(f"tenant weights: weight of {tenant!r} must be a finite number > 0, got {weight!r}")


def load_tenant_weights(path: Path) -> dict[str, float]:
    """A `--tenant-weights` file: one JSON object, tenant name -> weight (> 0; unlisted tenants
    weigh 1, `""` is the default tenant). A tenant of weight 2 gets twice the tokens of weight 1."""
    try:
        weights = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"tenant weights: cannot read {path}: {error}") from None
    if not isinstance(weights, dict):
        raise ValueError(f"tenant weights: {path} must hold a JSON object of tenant -> weight")
    check_weights(weights)
    return {tenant: float(weight) for tenant, weight in weights.items()}
