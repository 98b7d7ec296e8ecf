"""Batches and error checks shared by the CUDA kernel tests and their CPU emulation.

`assert_close` bounds the relative error of every (token, head) row, not one norm over the whole
output: a global norm lets short rows dilute long ones, so a merge that drops the last split of
an 8,200-token row, or a kernel that drops the last key of every multi-tile row, would still pass
(`tests/test_kernel_emulation.py` shows both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import reference

# Largest per-row relative error allowed. Measured noise floors of correct kernels (max over rows,
# fp32 reference on upcast inputs): bf16 2.8e-3, fp16 3.2e-4; these leave 3.5x and 4.5x of margin.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}
# The old single-norm check and its tolerances, kept to show what it lets through.
GLOBAL_TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
HEAD_CONFIGS = [(9, 3), (8, 8), (32, 8), (28, 4), (16, 1)]
CONTEXT_LENS = [1, 15, 16, 17, 511, 512, 513, 8200]
# (cached context before the chunk, chunk length): fresh prompts, chunks over a cached prefix,
# a lone decode row inside a mixed batch, and a chunk after a context longer than 8192.
PREFILL_SEQS = [(0, 37), (100, 64), (40, 1), (511, 2), (0, 300), (15, 17), (8192, 130), (1, 1)]


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    scale: float
    query_lens: list[int]
    seq_lens_list: list[int]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q, self.scale)

    def hints(self):
        return {"query_lens_cpu": self.query_lens, "seq_lens_cpu": self.seq_lens_list}


def make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, dtype, gen, *, block_size=16, q_scale=1.0,
               share_page=True, num_padding=0, device="cuda") -> Batch:
    """Random paged batch: shuffled block ids, two sequences sharing their first page, NaN in unowned slots.

    `num_padding` extra query rows follow the last sequence (their output must be zeros); a query
    length of 0 is an empty sequence (it has context but no query rows this step).
    """
    pages = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(pages) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    spare = ids[-1]  # never owned: all NaN, used as the block tables' padding
    width = max(pages) + 2
    rows, pos = [], 0
    for p in pages:
        rows.append(ids[pos:pos + p])
        pos += p
    full = [s for s, n in enumerate(seq_lens) if n >= block_size]
    if share_page and len(full) >= 2:
        rows[full[1]][0] = rows[full[0]][0]  # a shared (prefix-cached) full page; b's own block goes unowned
    owned = {row[i // block_size] * block_size + i % block_size for row, n in zip(rows, seq_lens) for i in range(n)}
    tables = [row + [spare] * (width - len(row)) for row in rows]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    unowned = torch.ones(num_blocks * block_size, dtype=torch.bool)
    unowned[list(owned)] = False
    k_cache.view(-1, num_kv_heads, head_dim)[unowned.to(device)] = float("nan")
    v_cache.view(-1, num_kv_heads, head_dim)[unowned.to(device)] = float("nan")
    num_tokens = sum(query_lens) + num_padding
    q = (torch.randn(num_tokens, num_heads, head_dim, generator=gen) * q_scale).to(device, dtype)
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    i32 = dict(dtype=torch.int32, device=device)
    return Batch(q, k_cache, v_cache, torch.tensor(tables, **i32), torch.tensor(seq_lens, **i32),
                 torch.tensor(cu, **i32), 1.0 / math.sqrt(head_dim), list(query_lens), list(seq_lens))


def prefill_batch(heads, head_dim, dtype, gen, **kwargs) -> Batch:
    """PREFILL_SEQS as one mixed batch: chunks of several lengths and two single-token decodes."""
    return make_batch([before + n for before, n in PREFILL_SEQS], [n for _, n in PREFILL_SEQS], *heads, head_dim,
                      dtype, gen, **kwargs)


def reference_out(b: Batch) -> torch.Tensor:
    """The torch reference in fp32 on upcast inputs (padding rows: zeros)."""
    k = torch.nan_to_num(b.k_cache.float())  # the reference must not see the poison either
    v = torch.nan_to_num(b.v_cache.float())
    return reference.paged_attention(b.q.float(), k, v, b.block_tables, b.seq_lens, b.cu_seqlens_q, b.scale,
                                     query_lens_cpu=b.query_lens, seq_lens_cpu=b.seq_lens_list)


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of every (token, head) row; a row whose reference is zero (padding) must be zero."""
    diff = (out.double() - ref.double()).norm(dim=-1)
    scale = ref.double().norm(dim=-1)
    zero_ref = torch.where(diff > 0, math.inf, 0.0)
    rel = torch.where(scale > 0, diff / scale.clamp_min(1e-300), zero_ref)
    return torch.where(torch.isnan(diff), math.inf, rel)


def global_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The old check: one relative L2 norm over the whole output."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tolerance: float | None = None) -> None:
    """Every element finite, every (token, head) row within `tolerance` (default TOLERANCE[dtype])."""
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
    errors = row_errors(out, ref)
    worst = int(errors.argmax())
    token, head = divmod(worst, errors.shape[1])
    err = errors.view(-1)[worst].item()
    assert err < tolerance, f"row (token {token}, head {head}): relative error {err:.3e} >= {tolerance}"
