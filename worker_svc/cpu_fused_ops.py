"""The decoder's small per-token ops as C++ kernels on a float32 CPU model (`kernels/cpu/elementwise*`).

Applied to a built model, like `worker_svc.cpu_linear.pack_linears` (the model file keeps its torch
versions, which stay the reference): `use_fused_cpu_ops(model)` hands every norm, MLP and attention
an `ElementwiseOps` whose ops call `torch.ops.omnibus_cpu_elementwise`. Each is one call in place of
several torch ops (float32 `F.rms_norm` alone runs as pow/mean/add/rsqrt/mul/mul), which at decode
batch sizes cost their dispatch, not their arithmetic: the residual add rides inside the following
norm, SiLU-and-mul reads the fused gate_up once, and the rotary rotates q and k in place inside the
qkv output. Results agree with torch to float32 rounding (tests/test_cpu_elementwise.py).

`CpuElementwise.argmax` is the sampler's row argmax (`Sampler(argmax=...)`), bit-exact with torch's
and 10-20x faster on a batch of logits rows (torch's walks each row element by element).

The kernels ship in the CPU attention extension (`kernels.cpu_ops`); loading it registers them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from worker_svc.models.llama import ElementwiseOps, LlamaForCausalLM
from worker_svc.sampler import torch_argmax

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CpuElementwise:
    """The loaded kernels and the ISA build they run (`avx512` or `avx2`)."""

    isa: str

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        torch.ops.omnibus_cpu_elementwise.rms_norm(out, x, weight, eps, self.isa)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: `residual += x`, then `x = rms_norm(residual)`; returns (x, residual)."""
        torch.ops.omnibus_cpu_elementwise.fused_add_rms_norm(x, residual, weight, eps, self.isa)
        return x, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops.omnibus_cpu_elementwise.silu_and_mul(out, gate_up, self.isa)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Neox rotary of `x` `[T, heads, head_dim]` (any token and head strides), in place."""
        torch.ops.omnibus_cpu_elementwise.rotary_neox(x, cos, sin, self.isa)
        return x

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits.argmax(dim=-1)` of `[N, vocab]` rows (the first largest; the first NaN where a row
        has one), vectorised; rows the kernel does not take (not float32 CPU rows with contiguous
        features, or 2^24 columns or more) go to torch."""
        if not _argmax_kernel_takes(logits):
            return logits.argmax(dim=-1)
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        torch.ops.omnibus_cpu_elementwise.argmax_rows(out, logits, self.isa)
        return out

    def ops(self) -> ElementwiseOps:
        return ElementwiseOps(rms_norm=self.rms_norm, add_rms_norm=self.add_rms_norm,
                              silu_and_mul=self.silu_and_mul, rotary=self.rotary)


def sampler_argmax(isa: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The row argmax for the sampler of a model `use_fused_cpu_ops` returned `isa` for."""
    return torch_argmax if isa is None else CpuElementwise(isa).argmax


def _argmax_kernel_takes(logits: torch.Tensor) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and 0 < logits.shape[1] < (1 << 24) and (logits.stride(1) == 1 or logits.shape[1] == 1))


def supported_isas() -> list[str]:
    """ISA builds of the kernels this CPU runs, best first; loads (building once) the extension
    unless this process has it already (the CPU attention kernels load it too)."""
    if not hasattr(torch.ops.omnibus_cpu_elementwise, "supported_isas"):
        from kernels.cpu_ops import build_extension

        build_extension()
    return list(torch.ops.omnibus_cpu_elementwise.supported_isas())


def load_cpu_elementwise(model: nn.Module, isa: str | None = None) -> tuple[CpuElementwise | None, str]:
    """(kernels, "") where they can run `model` (float32, on the CPU, extension built here), else
    (None, why not); an `isa` this CPU lacks raises."""
    if why_not := _model_unsuitable(model):
        return None, why_not
    try:
        supported = supported_isas()
    except Exception as error:  # compiler, ninja or headers missing
        return None, f"{type(error).__name__}: {error}".strip()
    if not supported:
        return None, "this CPU has neither AVX-512 nor AVX2 + FMA"
    if isa is not None and isa not in supported:
        raise ValueError(f"isa {isa!r} is not supported by this CPU (supported: {supported})")
    return CpuElementwise(isa or supported[0]), ""


def use_fused_cpu_ops(model: LlamaForCausalLM, isa: str | None = None) -> str | None:
    """Route `model`'s norms, SiLU-and-mul and rotary through the C++ kernels; returns the ISA, or
    None (logging why) where they cannot run it, which leaves the torch ops in place.

    Call once on the built model; before or after `shard_model` and `pack_linears` alike.
    """
    kernels, why_not = load_cpu_elementwise(model, isa)
    if kernels is None:
        logger.info("elementwise ops: torch (%s)", why_not)
        return None
    model.use_elementwise_ops(kernels.ops())
    logger.info("elementwise ops: CPU kernels (%s)", kernels.isa)
    return kernels.isa


def _model_unsuitable(model: nn.Module) -> str:
    for name, param in model.named_parameters():
        if param.device.type != "cpu" or param.dtype != torch.float32:
            return f"the kernels are float32 CPU only; {name} is {param.dtype} on {param.device}"
    return ""
