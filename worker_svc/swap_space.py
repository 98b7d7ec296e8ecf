"""The worker's CPU swap space: KV blocks of preempted requests, parked in host memory.

Same per-layer layout as the device pool (docs/CONTRACTS.md). Pinned on a CUDA worker so the
copies are DMA transfers. The scheduler owns which swap block holds what; the worker only copies
the (device block, swap block) pairs a `StepPlan` names.
"""

from __future__ import annotations

import time

import torch

from worker_svc.kv_cache import KVCaches, KVCacheSpec

BlockPairs = list[tuple[int, int]]  # (device block, swap block)


class SwapSpace:
    """`num_blocks` blocks of host memory mirroring the device KV pool's layout."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a swap space needs at least one block, got {num_blocks}")
        shape = spec.cache_shape(num_blocks)
        pin = device.type == "cuda"
        self.num_blocks = num_blocks
        self.device = device
        self.layers = [
            (torch.empty(shape, dtype=spec.dtype, pin_memory=pin),
             torch.empty(shape, dtype=spec.dtype, pin_memory=pin))
            for _ in range(spec.num_layers)
        ]

    def check(self, pairs: BlockPairs, num_device_blocks: int) -> None:
        """Raise ValueError on an id outside either pool, before anything is copied."""
        for device_block, swap_block in pairs:
            if not (0 <= device_block < num_device_blocks and 0 <= swap_block < self.num_blocks):
                raise ValueError(f"swap pair ({device_block}, {swap_block}) is outside the pools "
                                 f"({num_device_blocks} device, {self.num_blocks} swap blocks)")

    def swap_out(self, kv_caches: KVCaches, pairs: BlockPairs) -> None:
        """Copy device blocks into swap blocks; done before the step's forward may overwrite them."""
        if not pairs:
            return
        src, dst = self._indices(pairs)
        src = src.to(self.device)
        for (k_cache, v_cache), (k_swap, v_swap) in zip(kv_caches, self.layers):
            k_swap[dst] = k_cache[src].cpu()
            v_swap[dst] = v_cache[src].cpu()

    def swap_in(self, kv_caches: KVCaches, pairs: BlockPairs) -> None:
        """Copy swap blocks back into (newly allocated) device blocks."""
        if not pairs:
            return
        dst, src = self._indices(pairs)
        dst = dst.to(self.device)
        for (k_cache, v_cache), (k_swap, v_swap) in zip(kv_caches, self.layers):
            k_cache[dst] = k_swap[src].to(self.device, non_blocking=True)
            v_cache[dst] = v_swap[src].to(self.device, non_blocking=True)

    def measure_bytes_per_s(self, kv_caches: KVCaches, bytes_per_block: int, repeats: int = 3) -> float:
        """Median rate of swapping blocks out and back in, in bytes per second one way.

        The scheduler weighs it against recomputation when it picks how to preempt.
        """
        num = min(self.num_blocks, kv_caches[0][0].shape[0], 64)
        pairs = [(i, i) for i in range(num)]
        saved = [(k[:num].clone(), v[:num].clone()) for k, v in kv_caches]  # swap_in overwrites them
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.swap_out(kv_caches, pairs)
            self.swap_in(kv_caches, pairs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            rates.append(2 * num * bytes_per_block / (time.perf_counter() - started))
        for (k, v), (k_saved, v_saved) in zip(kv_caches, saved):
            k[:num], v[:num] = k_saved, v_saved
        return sorted(rates)[len(rates) // 2]

    @staticmethod
    def _indices(pairs: BlockPairs) -> tuple[torch.Tensor, torch.Tensor]:
        device_blocks, swap_blocks = zip(*pairs)
        return torch.tensor(device_blocks, dtype=torch.int64), torch.tensor(swap_blocks, dtype=torch.int64)
