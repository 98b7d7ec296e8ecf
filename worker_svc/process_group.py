"""Joining the tensor-parallel group: `torch.distributed` over NCCL (GPUs) or gloo (CPUs).

The rendezvous is torch's own (`tcp://HOST:PORT`, `env://`, `file://`), so any launcher that can
start N processes with a rank each will do; Omnibus runs no cluster manager of its own. The
timeout bounds every collective: a rank whose peer died mid-step raises instead of waiting
forever, and the worker then exits so that its supervisor starts the group anew.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from worker_svc.parallel_config import DIST_BACKENDS, ParallelConfig

logger = logging.getLogger(__name__)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` is NCCL for CUDA ranks and gloo for CPU ranks."""
    if backend not in DIST_BACKENDS:
        raise ValueError(f"dist_backend {backend!r} is not one of {DIST_BACKENDS}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; CPU ranks use gloo")
    return backend


def join_group(parallel: ParallelConfig, init_method: str, backend: str, device: torch.device,
               timeout_s: float) -> str:
    """Initialise the default process group for this rank; returns the backend used."""
    backend = resolve_backend(backend, device)
    logger.info("rank %d of %d joining the %s group at %s", parallel.rank, parallel.world_size, backend,
                init_method)
    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=parallel.rank,
                            world_size=parallel.world_size, timeout=timedelta(seconds=timeout_s), **extra)
    return backend


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
