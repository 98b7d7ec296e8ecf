"""Where a worker sits in its tensor-parallel group, and whether a model divides over it.

Importable without torch: the `omnibus` CLI checks a model's head counts against
`--tensor-parallel-size` before it spawns a single rank.

A rank learns its place from flags or, when they are absent, from the variables every launcher
sets (torchrun, Slurm scripts, Kubernetes indexed jobs): `RANK`, `WORLD_SIZE`, and `MASTER_ADDR` +
`MASTER_PORT` for the rendezvous (`env://`); `LOCAL_WORLD_SIZE` shares a host's cores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DIST_BACKENDS = ("auto", "nccl", "gloo")  # auto: nccl on a GPU, gloo on a CPU
DIST_BACKEND_HELP = "collective backend between the ranks: auto (nccl on GPUs, gloo on CPUs), nccl or gloo"


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Where this process sits in the tensor-parallel group."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")


def check_shardable(config, world_size: int) -> None:
    """Raise ValueError naming every size of `config` (a transformers config, or anything with
    its attribute names) that does not divide by `world_size`."""
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    }
    bad = [f"{name}={value}" for name, value in sizes.items() if value % world_size]
    if bad:
        raise ValueError(
            f"tensor parallel size {world_size} must divide {', '.join(bad)} "
            "(each rank keeps whole query and KV heads and an equal MLP slice)"
        )


def env_int(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    """An integer launcher variable, or `default` when it is unset; a malformed one is an error."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def default_init_method(environ: Mapping[str, str] = os.environ) -> str | None:
    """`env://` where the launcher set MASTER_ADDR and MASTER_PORT, else None (pass a flag)."""
    return "env://" if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT") else None


def threads_per_rank(num_cores: int, ranks_on_this_host: int) -> int:
    """A CPU rank's share of this host's cores (at least one)."""
    return max(1, num_cores // max(1, ranks_on_this_host))
