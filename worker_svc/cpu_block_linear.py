"""Small-batch matrix products over the checkpoint's own quantized blocks (`kernels/cpu/block_linear*`).

The default model ships as a GGUF whose linears are Q4_1 (and its embedding, the tied LM head,
Q8_0); the model loads them dequantized into float32, so each weight is `d * q + min` (or `d * q`)
for a float16 `d` and `min` per block of 32. Decode at a few rows streams every weight once per
step, so its matrix products cost the weights' bytes: 4 a weight in float32, 0.75 in Q4_1 blocks.

`use_block_weights` recovers those blocks from a built float32 model, exactly: a linear whose
every block re-dequantizes to its float32 values bit for bit gets a `BlockLinear`, which runs up to
`MAX_BLOCK_ROWS` rows through the C++ kernel (dequantizing each block in registers into the same
float32 numbers) and more rows through the dense linear it wraps. Any other linear (a float32
checkpoint, a block a k-slice cuts) keeps its dense path. Outputs differ from the dense GEMM by
summation order only, as oneDNN's differ from `F.linear`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from worker_svc.models.llama import Linear, LlamaForCausalLM

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per scale (llama.cpp's QK4_1 and QK8_0)
Q4_1, Q8_0 = 0, 1  # kernels/cpu/block_linear.h BlockFormat
# Rows up to which the kernel beats oneDNN on this model's shapes (2-core AVX-512 VM: 3.5x at 1
# row, 1.6x at 12, 0.9x at 16; benchmarks/cpu_step.py, docs/benchmarks.md).
MAX_BLOCK_ROWS = 12


@dataclass(frozen=True)
class BlockWeights:
    """A `[out, in]` weight as blocks of 32 along `in`: `q` uint8 `[out, in / 2]` (Q4_1: element j
    of a block in the low nibble of byte j, element j + 16 in its high one) or int8 `[out, in]`
    (Q8_0); `scale` and (Q4_1) `min` float32 `[out, in / 32]`."""

    format: int
    q: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, computed as the GGUF dequantizer does (`d * q + min`)."""
        out_features = self.q.shape[0]
        if self.format == Q4_1:
            packed = self.q.view(out_features, -1, BLOCK // 2)
            q = torch.cat([packed & 15, packed >> 4], dim=-1).float()
            return (self.scale.unsqueeze(-1) * q + self.min.unsqueeze(-1)).reshape(out_features, -1)
        q = self.q.view(out_features, -1, BLOCK).float()
        return (self.scale.unsqueeze(-1) * q).reshape(out_features, -1)


def exact_blocks(weight: torch.Tensor) -> BlockWeights | None:
    """`weight`'s Q4_1 blocks, else its Q8_0 blocks, where every block reproduces it exactly."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK or weight.numel() == 0:
        return None
    blocks = weight.detach().reshape(weight.shape[0], -1, BLOCK)
    for candidate in (_q4_1, _q8_0):
        found = candidate(blocks)
        if torch.equal(found.dequantize(), weight):
            return found
    return None


def _q4_1(blocks: torch.Tensor) -> BlockWeights:
    # llama.cpp: min = the block's minimum (q = 0), d = (max - min) / 15 (the maximum gets q = 15),
    # both stored as float16. So the dequantized block's minimum is min and its maximum d * 15 + min.
    low = blocks.amin(-1, keepdim=True)
    scale = ((blocks.amax(-1, keepdim=True) - low) / 15).half().float()
    # A constant block has d = 0: 0 / 0 gives q = 0 (any q would do). The clamp keeps the packing
    # in range for blocks that are not Q4_1 at all, which the caller's check then refuses.
    q = ((blocks - low) / scale).nan_to_num(0.0).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return BlockWeights(Q4_1, packed.reshape(blocks.shape[0], -1).contiguous(), scale.squeeze(-1).contiguous(),
                        low.squeeze(-1).contiguous())


def _q8_0(blocks: torch.Tensor) -> BlockWeights:
    # llama.cpp: d = max |w| / 127 as float16, q = round(w / d): the largest magnitude is d * 127.
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = (blocks / scale).nan_to_num(0.0).round().clamp(-127, 127)  # an all-zero block: d = 0, q = 0
    return BlockWeights(Q8_0, q.to(torch.int8).reshape(blocks.shape[0], -1).contiguous(),
                        scale.squeeze(-1).contiguous(), None)


class BlockLinear(nn.Module):
    """A linear that runs up to `MAX_BLOCK_ROWS` rows on its blocks and more on `dense` (a `Linear`,
    or the `PackedLinear` that `pack_linears` makes of it, applied after this)."""

    def __init__(self, dense: Linear, blocks: BlockWeights, extension, isa: str):
        super().__init__()
        self.dense = dense
        self.in_features = dense.weight.shape[1]
        self.format = blocks.format
        self.register_buffer("q", blocks.q, persistent=False)
        self.register_buffer("scale", blocks.scale, persistent=False)
        self.register_buffer("min", blocks.min, persistent=False)
        self.extension = extension
        self.isa = isa

    @property
    def bias(self) -> torch.Tensor | None:
        return self.dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 0 < x.shape[0] <= MAX_BLOCK_ROWS and x.dim() == 2 and x.stride(1) == 1:
            return self.extension.block_linear(x, self.q, self.scale, self.min, self.bias, self.format, self.isa)
        return self.dense(x)


def use_block_weights(model: LlamaForCausalLM, isa: str) -> tuple[int, int]:
    """Wrap every `Linear` of the float32 CPU `model` whose weight is exact Q4_1 or Q8_0 blocks in a
    `BlockLinear` (the LM head included); returns (wrapped, linears). Call after `shard_model`
    (a rank's slices are checked as they are) and before `pack_linears`, which packs each
    `BlockLinear`'s dense linear as it does every other."""
    from kernels.cpu_ops import build_extension

    extension = build_extension()
    wrapped = total = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Linear):
                continue
            total += 1
            blocks = exact_blocks(child.weight)
            if blocks is not None:
                setattr(parent, name, BlockLinear(child, blocks, extension, isa))
                wrapped += 1
    logger.info("block weights: %d of %d linears run batches of up to %d rows on their Q4_1/Q8_0 blocks",
                wrapped, total, MAX_BLOCK_ROWS)
    return wrapped, total
