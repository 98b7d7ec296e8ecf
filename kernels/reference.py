"""Plain torch attention kernels: the CPU execution path and the reference for the CUDA kernels.

Cache layout (docs/CONTRACTS.md): per layer `k_cache`/`v_cache` are
`[num_blocks, block_size, num_kv_heads, head_dim]` (int8: `head_dim + 4`, each row's float32 scale
after its values, `kernels/int8_kv.py`); token `i` of a sequence sits in slot
`block_table[i // block_size] * block_size + i % block_size`.

Everything here computes the softmax and its accumulation in float32 whatever the cache dtype, so
the reference is at least as accurate as any kernel tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import int8_kv

# Upper bound on the elements of one padded K (or V) gather in the batched decode path: large
# batches of long sequences are attended in groups so the CPU path never allocates gigabytes.
_DECODE_GATHER_BUDGET = 1 << 25


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store `key`/`value` `[T, num_kv_heads, head_dim]` at `slot_mapping` `[T]` (< 0: skipped).

    An int8 cache gets each row quantized (`kernels/int8_kv.py`); any other is cast to.
    """
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k.index_copy_(0, slots, _to_cache_rows(key[valid], k_cache.dtype))
    flat_v.index_copy_(0, slots, _to_cache_rows(value[valid], v_cache.dtype))


def _to_cache_rows(rows: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    return int8_kv.quantize_rows(rows) if cache_dtype == torch.int8 else rows.to(cache_dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """Attention of a flattened varlen batch over the paged cache: `[T, num_heads, head_dim]`.

    Each sequence's queries are its last `q_len` positions: causal within the chunk and full
    attention to the cached context before it. Decodes (q_len 1) are attended together as one
    padded batch; longer chunks go one sequence at a time through SDPA. Pass the host-side
    `query_lens_cpu`/`seq_lens_cpu` to avoid reading the device tensors back.
    """
    if query_lens_cpu is None:
        query_lens_cpu = torch.diff(cu_seqlens_q).tolist()
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    starts = _exclusive_cumsum(query_lens_cpu)
    out = torch.empty_like(q)
    if starts[-1] < q.shape[0]:
        out[starts[-1] :].zero_()  # padding rows past the last sequence
    decodes = [s for s, n in enumerate(query_lens_cpu) if n == 1]
    for group in _decode_groups(decodes, seq_lens_cpu, k_cache):
        rows = torch.tensor([starts[s] for s in group], device=q.device)
        lens = [seq_lens_cpu[s] for s in group]
        tables = block_tables[torch.tensor(group, device=q.device)]
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, tables, lens, scale).to(q.dtype)
    for s, q_len in enumerate(query_lens_cpu):
        if q_len > 1:
            rows = slice(starts[s], starts[s] + q_len)
            out[rows] = _chunk_attention(
                q[rows], k_cache, v_cache, block_tables[s], seq_lens_cpu[s], scale
            ).to(q.dtype)
    return out


@dataclass(slots=True, frozen=True)
class AttentionOps:
    """The two kernels a model calls; a CUDA implementation with these signatures plugs in."""

    write_kv: Callable[..., None] = write_kv
    paged_attention: Callable[..., torch.Tensor] = paged_attention


def _exclusive_cumsum(lengths: list[int]) -> list[int]:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return starts


def _decode_groups(
    decodes: list[int], seq_lens: list[int], k_cache: torch.Tensor
) -> list[list[int]]:
    """Split decode sequences (sorted by length, to limit padding) into memory-bounded groups."""
    per_token = k_cache.shape[2] * k_cache.shape[3]
    groups: list[list[int]] = []
    current: list[int] = []
    for s in sorted(decodes, key=lambda s: seq_lens[s]):
        if current and (len(current) + 1) * seq_lens[s] * per_token > _DECODE_GATHER_BUDGET:
            groups.append(current)
            current = []
        current.append(s)
    if current:
        groups.append(current)
    return groups


def _gather_heads_major(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """float32 `[S, kv_heads, num_blocks * block_size, head_dim]` for `[S, num_blocks]` tables.

    Whole pages via `index_select` (several times faster on CPU than advanced indexing), then one
    transposing copy into the head-major layout SDPA wants.
    """
    num_seqs, num_blocks = block_tables.shape
    _, block_size, num_kv_heads, _ = cache.shape
    pages = cache.index_select(0, block_tables.reshape(-1).long())
    if cache.dtype == torch.int8:
        pages = int8_kv.dequantize_rows(pages)
    pages = pages.view(num_seqs, num_blocks * block_size, num_kv_heads, -1).transpose(1, 2)
    return pages.to(torch.float32, memory_format=torch.contiguous_format)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """One query per sequence: padded K/V gathered per KV head, masked by length, batched matmuls.

    Decode attention is bound by memory traffic. Gathering one KV head at a time lands each key
    directly in a contiguous `[S, L, D]` operand (one copy, no transpose pass), without the wasted
    work of attending every query head to every KV head.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max(seq_lens) // block_size)
    padded_len = num_blocks * block_size
    lens = torch.tensor(seq_lens, device=q.device)
    # Padding entries of a block table may hold anything (even out-of-range ids): read block 0.
    blocks_needed = (lens[:, None] + block_size - 1) // block_size
    used = torch.arange(num_blocks, device=q.device) < blocks_needed
    pages = torch.where(used, block_tables[:, :num_blocks], 0).reshape(-1).long()
    invalid = torch.arange(padded_len, device=q.device) >= lens[:, None]  # [S, L]
    seq_idx, pos_idx = invalid.nonzero(as_tuple=True)
    group = num_heads // num_kv_heads
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    out = torch.empty(num_seqs, num_kv_heads, group, head_dim, device=q.device)
    for h in range(num_kv_heads):
        k = int8_kv.to_float(k_cache[:, :, h].index_select(0, pages)).view(num_seqs, padded_len, head_dim)
        v = int8_kv.to_float(v_cache[:, :, h].index_select(0, pages)).view(num_seqs, padded_len, head_dim)
        # Slots past seq_len hold stale data or NaN. Masking the scores drops a NaN key, but
        # 0 * NaN in the value sum is NaN, so zero those values (only the ragged tails).
        v[seq_idx, pos_idx] = 0
        scores = torch.bmm(qg[:, h], k.transpose(1, 2)).mul_(scale)  # [S, g, L]
        scores.masked_fill_(invalid[:, None, :], -math.inf)
        out[:, h] = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(num_seqs, num_heads, head_dim)


def _chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """A prefill chunk of one sequence: causal within the chunk, sees all the context before it."""
    q_len, num_heads, _ = q.shape
    num_blocks = -(-seq_len // k_cache.shape[1])
    tables = block_table[None, :num_blocks]
    k = _gather_heads_major(k_cache, tables)[:, :, :seq_len]  # [1, kvh, L, D]
    v = _gather_heads_major(v_cache, tables)[:, :, :seq_len]
    mask = None
    if seq_len > q_len:
        # Query i sits at absolute position seq_len - q_len + i and sees keys up to it.
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - q_len)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=num_heads != k.shape[1],
    )
    return out[0].transpose(0, 1)


def paged_attention_naive(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Deliberately naive paged attention (python loops, float64, explicit softmax): tests only."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        table = block_tables[s].tolist()
        locations = [(table[i // block_size], i % block_size) for i in range(seq_len)]
        keys = int8_kv.to_float(torch.stack([k_cache[b, o] for b, o in locations])).double()  # [L, kvh, D]
        values = int8_kv.to_float(torch.stack([v_cache[b, o] for b, o in locations])).double()
        q_len = cu[s + 1] - cu[s]
        for h in range(num_heads):
            kvh = h // group
            for i in range(q_len):
                visible = seq_len - q_len + i + 1
                logits = (keys[:visible, kvh] @ q[cu[s] + i, h].double()) * scale
                weights = torch.exp(logits - logits.max())
                out[cu[s] + i, h] = (weights / weights.sum()) @ values[:visible, kvh]
    return out
