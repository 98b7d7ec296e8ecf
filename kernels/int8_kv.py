"""The int8 KV cache's row format (`--kv-cache-dtype int8`): what both kernels and the pool agree on.

An int8 cache keeps each (token, KV head) row as `head_dim` int8 values followed by one float32
scale per group of 32 values, so a cache is `[num_blocks, block_size, num_kv_heads, head_dim * 9/8]`
int8 and a block still holds everything about its tokens: swap, prefix sharing and block copies
move whole blocks and need not know. Each group is quantized symmetrically: scale = max |x| / 127,
value = round-half-even(x / scale) in [-127, 127]; the cached number is value * scale, within
scale / 2 of x. This is llama.cpp's q8_0 layout with a float32 scale in place of its float16 one,
so 9 bits per value; one scale per 64-value row measured twice the logit error on the default model.
The C++ kernels (`kernels/cpu`) quantize and dequantize with exactly these float32 operations.
"""

from __future__ import annotations

import torch

GROUP = 32  # values per scale
SCALE_BYTES = 4  # one float32


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one (token, KV head) row of a cache of `dtype`."""
    if dtype != torch.int8:
        return head_dim
    if head_dim % GROUP:
        raise ValueError(f"an int8 KV cache needs a head_dim that is a multiple of {GROUP}, got {head_dim}")
    return head_dim + head_dim // GROUP * SCALE_BYTES


def head_dim_of(cache: torch.Tensor) -> int:
    """The head_dim a `[blocks, block_size, kv_heads, row]` cache holds."""
    width = cache.shape[-1]
    return width * GROUP // (GROUP + SCALE_BYTES) if cache.dtype == torch.int8 else width


def quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """`[..., head_dim]` floats -> `[..., head_dim * 9/8]` int8 rows (a NaN group: NaN scale, zeros)."""
    head_dim = rows.shape[-1]
    row_width(head_dim, torch.int8)  # checks head_dim
    groups = rows.float().unflatten(-1, (head_dim // GROUP, GROUP))
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    values = torch.where(scale > 0, groups / scale, 0.0).round().clamp(-127, 127).nan_to_num(0.0)
    return torch.cat([values.flatten(-2).to(torch.int8), scale.view(torch.int8).flatten(-2)], dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """`[..., head_dim * 9/8]` int8 rows -> `[..., head_dim]` float32 (value * its group's scale)."""
    head_dim = head_dim_of(rows)
    scale = rows[..., head_dim:].contiguous().view(torch.float32)  # [..., head_dim / GROUP]
    values = rows[..., :head_dim].float().unflatten(-1, (head_dim // GROUP, GROUP))
    return (values * scale[..., None]).flatten(-2)


def to_float(cache_rows: torch.Tensor) -> torch.Tensor:
    """float32 values of rows read from a cache of any dtype."""
    return dequantize_rows(cache_rows) if cache_rows.dtype == torch.int8 else cache_rows.float()
