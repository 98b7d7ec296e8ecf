"""Matrix products at their best on a CPU: the model's linears on oneDNN with prepacked weights.

Applied to a built model (the model file stays plain `F.linear`). oneDNN reorders each weight once
into the blocked layout its GEMM kernels stream from, instead of MKL repacking the operand on every
call; on our 2-core machines that measured 2-3x faster than `F.linear` at every batch size from 1 to
256 (benchmarks/cpu_step.py, docs/benchmarks.md), and at batch 1 it streams the weights at most of
the memory bandwidth, so no hand-written GEMV beats it. The summation order changes; outputs agree
with `F.linear` to float32 rounding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from worker_svc.backends import LINEAR_BACKENDS
from worker_svc.cpu_block_linear import use_block_weights
from worker_svc.models.llama import Linear, LlamaForCausalLM

logger = logging.getLogger(__name__)

# oneDNN picks its weight layout for an expected batch; measured flat from 1 to 256 at this hint.
_BATCH_HINT = 32


class PackedLinear(nn.Module):
    """`y = x W^T + b` through oneDNN with `W` reordered once at construction (float32, CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def onednn_available(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return torch.backends.mkldnn.is_available() and weight.device.type == "cpu" and weight.dtype == torch.float32


def prepare_linears(model: LlamaForCausalLM, backend: str) -> str:
    """Resolve `backend` for `model` and apply it (after `shard_model`: each rank's own slices);
    returns the backend it runs."""
    isas = _block_kernel_isas() if backend in ("auto", "blocks") and onednn_available(model) else []
    resolved = resolve_linear_backend(backend, model, bool(isas))
    if resolved == "blocks":
        use_block_weights(model, isas[0])
    if resolved in ("blocks", "onednn"):
        pack_linears(model)
    return resolved


def _block_kernel_isas() -> list[str]:
    try:
        from worker_svc.cpu_fused_ops import supported_isas

        return supported_isas()
    except Exception as error:  # compiler, ninja or headers missing: cpu_ops logs why
        logger.info("block weights: no C++ kernels (%s: %s)", type(error).__name__, error)
        return []


def resolve_linear_backend(backend: str, model: nn.Module, block_kernels: bool) -> str:
    """`auto` is `blocks` for a float32 CPU model when torch has oneDNN and `block_kernels` (the C++
    extension runs here), `onednn` without them, else `torch` (`F.linear`)."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear backend {backend!r} is not one of {LINEAR_BACKENDS}")
    if backend == "torch":
        return "torch"
    if not onednn_available(model):
        if backend != "auto":
            raise ValueError(f"the {backend} linear backend needs a float32 CPU model and torch built with oneDNN")
        return "torch"
    if backend == "blocks" and not block_kernels:
        raise ValueError("the blocks linear backend needs the C++ CPU kernels, which cannot be built or run here")
    return "blocks" if backend == "blocks" or (backend == "auto" and block_kernels) else "onednn"


def pack_linears(model: LlamaForCausalLM) -> int:
    """Replace every `Linear` of `model` (the LM head included, and the dense linear of each
    `BlockLinear`) by a `PackedLinear`; returns how many.

    The unpacked weights are released, except a tied LM head's, which the embedding still reads.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                replaced += 1
    return replaced
