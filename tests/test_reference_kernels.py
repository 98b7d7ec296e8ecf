"""The torch reference kernels against a python-loop reference and against SDPA on contiguous K/V."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from kernels.reference import paged_attention, paged_attention_naive, write_kv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Decode context lengths straddling page boundaries, including a lone token.
EDGE_LENS = [1, 15, 16, 17, 511, 512, 513]


def make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size,
               *, share_first_page=False, dtype=torch.float32):
    """A paged batch: every slot not holding a live token is NaN, block tables are shuffled and
    their padding entries point far outside the cache."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    ids = list(range(num_blocks))
    random.shuffle(ids)
    tables = []
    for n in blocks_per_seq:
        tables.append(ids[:n])
        ids = ids[n:]
    if share_first_page:
        # Sequence 1 reuses sequence 0's first (full) page, like a prefix-cache hit.
        assert seq_lens[0] >= block_size and seq_lens[1] >= block_size
        tables[1][0] = tables[0][0]
    width = max(blocks_per_seq) + 2
    padded = [t + [10**6] * (width - len(t)) for t in tables]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for table, n in zip(tables, seq_lens):
        for i in range(n):
            k_cache[table[i // block_size], i % block_size] = torch.randn(num_kv_heads, head_dim)
            v_cache[table[i // block_size], i % block_size] = torch.randn(num_kv_heads, head_dim)
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    q = torch.randn(cu[-1], num_heads, head_dim).to(dtype)
    i32 = dict(dtype=torch.int32)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=torch.tensor(padded, **i32),
        seq_lens=torch.tensor(seq_lens, **i32), cu_seqlens_q=torch.tensor(cu, **i32),
        scale=head_dim**-0.5,
    )


def run_both(batch, query_lens, seq_lens):
    fast = paged_attention(**batch, query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    naive = paged_attention_naive(**batch)
    assert not fast.isnan().any(), "NaN from unused cache slots leaked into the output"
    return fast, naive


def mixed_batch_lens(block_size):
    """Decodes at the edge lengths, a chunk after prior context, a fresh prefill, interleaved."""
    seq_lens = [513, 3 * block_size + 5, 1, 16, 20, 512, 15, 17, 511]
    query_lens = [1, 9, 1, 1, 20, 1, 1, 1, 1]
    return seq_lens, query_lens


def test_write_kv_matches_loop(seed):
    num_blocks, block_size, kvh, d = 6, 8, 3, 16
    k_cache = torch.randn(num_blocks, block_size, kvh, d)
    v_cache = torch.randn(num_blocks, block_size, kvh, d)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:20]
    slots[torch.randperm(20)[:5]] = -1
    key, value = torch.randn(20, kvh, d), torch.randn(20, kvh, d)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[t]
            expected_v[slot // block_size, slot % block_size] = value[t]
    write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_write_kv_casts_to_cache_dtype(seed):
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    v_cache = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    key, value = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    write_kv(key, value, k_cache, v_cache, torch.tensor([5, -1]))
    assert torch.equal(k_cache[1, 1], key[0].bfloat16())
    assert torch.count_nonzero(k_cache) == torch.count_nonzero(key[0].bfloat16())
    assert torch.equal(v_cache[1, 1], value[0].bfloat16())


@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (32, 8), (16, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_matches_naive(seed, heads, head_dim, block_size):
    random.seed(seed)
    seq_lens, query_lens = mixed_batch_lens(block_size)
    batch = make_batch(seq_lens, query_lens, *heads, head_dim, block_size, share_first_page=True)
    fast, naive = run_both(batch, query_lens, seq_lens)
    torch.testing.assert_close(fast.double(), naive, atol=1e-5, rtol=1e-5)


def test_paged_attention_prefill_chunks_and_fresh_prefills(seed):
    random.seed(seed)
    seq_lens = [40, 33, 2, 70]
    query_lens = [40, 8, 2, 31]  # fresh, chunk after context, tiny fresh, chunk across pages
    batch = make_batch(seq_lens, query_lens, 8, 2, 64, 16)
    fast, naive = run_both(batch, query_lens, seq_lens)
    torch.testing.assert_close(fast.double(), naive, atol=1e-5, rtol=1e-5)


def test_paged_attention_without_host_lists(seed):
    random.seed(seed)
    seq_lens, query_lens = mixed_batch_lens(16)
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, 16)
    torch.testing.assert_close(
        paged_attention(**batch).double(), paged_attention_naive(**batch), atol=1e-5, rtol=1e-5
    )


def test_decode_groups_split_under_memory_budget(seed, monkeypatch):
    random.seed(seed)
    seq_lens = [random.randint(1, 200) for _ in range(40)]
    query_lens = [1] * 40
    batch = make_batch(seq_lens, query_lens, 4, 2, 64, 8)
    whole = paged_attention(**batch)
    monkeypatch.setattr(reference, "_DECODE_GATHER_BUDGET", 2 * 64 * 400)
    assert len(reference._decode_groups(list(range(40)), seq_lens, batch["k_cache"])) > 5
    grouped = paged_attention(**batch)
    torch.testing.assert_close(grouped.double(), paged_attention_naive(**batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-6)


def test_bfloat16_cache_accumulates_in_float32(seed):
    random.seed(seed)
    seq_lens, query_lens = [300, 50, 17], [1, 50, 4]
    batch = make_batch(seq_lens, query_lens, 8, 2, 64, 16, dtype=torch.bfloat16)
    fast, naive = run_both(batch, query_lens, seq_lens)
    assert fast.dtype == torch.bfloat16
    # One bf16 rounding of the output on top of an exact (float64) computation from the same inputs.
    torch.testing.assert_close(fast.double(), naive, atol=2e-2, rtol=1e-2)


def test_rows_past_the_last_sequence_are_zero(seed):
    random.seed(seed)
    batch = make_batch([5, 9], [1, 1], 2, 1, 64, 8)
    batch["q"] = torch.cat([batch["q"], torch.full((3, 2, 64), float("nan"))])
    out = paged_attention(**batch)
    assert torch.equal(out[2:], torch.zeros(3, 2, 64))
    expected = paged_attention_naive(**batch)[:2]
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-5, rtol=1e-5)


def sdpa_contiguous(q, keys, values, scale):
    """Bottom-right-aligned causal SDPA of one sequence on contiguous `[L, kvh, D]` K/V."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    mask = torch.arange(seq_len)[None, :] <= query_pos
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("heads,block_size", [((9, 3), 16), ((32, 8), 8), ((16, 1), 32)])
def test_paged_attention_matches_sdpa_on_contiguous_kv(seed, heads, block_size):
    num_heads, num_kv_heads = heads
    head_dim = 64
    seq_lens = [1, 37, 16, 200, 64, 129]
    query_lens = [1, 37, 1, 13, 1, 64]
    keys = [torch.randn(n, num_kv_heads, head_dim) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim) for n in seq_lens]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    block_ids = torch.randperm(num_blocks).split(blocks_per_seq)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for s, (ids, n) in enumerate(zip(block_ids, seq_lens)):
        tables[s, : len(ids)] = ids.int()
        pos = torch.arange(n)
        slots = ids[pos // block_size] * block_size + pos % block_size
        write_kv(keys[s], values[s], k_cache, v_cache, slots)
    qs = [torch.randn(q, num_heads, head_dim) for q in query_lens]
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_attention(torch.cat(qs), k_cache, v_cache, tables, lens, cu, head_dim**-0.5)
    expected = torch.cat([sdpa_contiguous(q, k, v, head_dim**-0.5) for q, k, v in zip(qs, keys, values)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
