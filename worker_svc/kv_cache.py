"""The paged KV cache pool: per layer a `(k_cache, v_cache)` pair, and how many blocks fit.

Layout (docs/CONTRACTS.md): each cache is `[num_blocks, block_size, num_kv_heads, head_dim]`,
contiguous, so slot `b * block_size + i` is row `i` of block `b`; an int8 cache's rows are
`head_dim + 4` wide, a float32 scale after the values (`kernels/int8_kv.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import int8_kv

logger = logging.getLogger(__name__)

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]

_GIB = 1 << 30


@dataclass(slots=True)
class KVCacheSpec:
    """Shape of one layer's K (or V) cache block, and the element type."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def cache_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """One layer's K (or V) cache of `num_blocks` blocks."""
        return (num_blocks, self.block_size, self.num_kv_heads, int8_kv.row_width(self.head_dim, self.dtype))

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across every layer, K and V together."""
        _, block_size, num_kv_heads, row = self.cache_shape(1)
        return 2 * self.num_layers * block_size * num_kv_heads * row * self.dtype.itemsize


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> KVCaches:
    """Allocate the pool, zero-filled so a stray read of an unwritten slot is harmless."""
    if num_blocks <= 0:
        raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
    shape = spec.cache_shape(num_blocks)
    return [
        (
            torch.zeros(shape, dtype=spec.dtype, device=device),
            torch.zeros(shape, dtype=spec.dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    """How many whole blocks fit in `budget_bytes`; raises if not even one does."""
    num_blocks = int(budget_bytes) // spec.bytes_per_block
    if num_blocks <= 0:
        raise ValueError(
            f"no room for the KV cache: budget {budget_bytes / _GIB:.3f} GiB, "
            f"one block needs {spec.bytes_per_block / _GIB:.6f} GiB"
        )
    return num_blocks


def cpu_num_blocks(spec: KVCacheSpec, kv_cache_memory_gb: float) -> int:
    """Blocks for a CPU worker: a fixed budget, since host memory has no reliable free figure."""
    return num_blocks_for_budget(spec, int(kv_cache_memory_gb * _GIB))


def cuda_num_blocks(
    spec: KVCacheSpec,
    device: torch.device,
    gpu_memory_utilization: float,
    profile_step: Callable[[], None],
) -> int:
    """Blocks for a CUDA worker, from what is left after weights and a measured peak step.

    Call after the weights are loaded. `profile_step` runs the largest step the worker will see
    (without the real KV cache); its peak allocation beyond the weights is reserved for
    activations. Memory used outside torch (CUDA context, other processes) is counted via
    `mem_get_info`.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_before = total - free
    allocated_before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile_step()
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - allocated_before
    torch.cuda.empty_cache()
    budget = int(total * gpu_memory_utilization) - used_before - activation_peak
    logger.info(
        "KV cache budget: total %.2f GiB x %.2f, in use %.2f GiB, activation peak %.2f GiB "
        "-> %.2f GiB",
        total / _GIB, gpu_memory_utilization, used_before / _GIB, activation_peak / _GIB,
        budget / _GIB,
    )
    return num_blocks_for_budget(spec, budget)
