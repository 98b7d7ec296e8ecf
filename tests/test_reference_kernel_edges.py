"""Edges of the torch reference kernels that tests/test_reference_kernels.py leaves open: a
softmax scale other than 1/sqrt(head_dim), a GQA chunk as long as the head count, the exact
memory-bounded decode groups, and the layout of the gathered pages."""

from __future__ import annotations

import random

import torch

from kernels import reference
from tests.test_reference_kernels import make_batch, run_both


def test_a_custom_scale_reaches_decodes_and_chunks(seed):
    random.seed(seed)
    seq_lens, query_lens = [8, 30, 17], [8, 1, 5]  # a fresh prefill as long as the 8 heads
    batch = make_batch(seq_lens, query_lens, 8, 2, 64, 16)
    batch["scale"] = 0.37  # not 64 ** -0.5, the default SDPA would fall back to
    fast, naive = run_both(batch, query_lens, seq_lens)
    torch.testing.assert_close(fast.double(), naive, atol=1e-5, rtol=1e-5)


def test_decode_groups_are_split_exactly_at_the_budget(monkeypatch):
    # A group's padded gather is members x longest x kv_heads x head_dim elements. Here 2 x 4 = 8
    # per token and a budget of 320: lengths 10 and 20 fit together (2 x 20 x 8 = 320), adding 30
    # would make 3 x 30 x 8 = 720, and 30 with 40 would make 2 x 40 x 8 = 640.
    monkeypatch.setattr(reference, "_DECODE_GATHER_BUDGET", 320)
    k_cache = torch.empty(1, 4, 2, 4)
    assert reference._decode_groups([0, 1, 2, 3], [10, 30, 20, 40], k_cache) == [[0, 2], [1], [3]]
    assert reference._decode_groups([1, 3], [10, 30, 20, 40], k_cache) == [[1], [3]]
    assert reference._decode_groups([], [10], k_cache) == []


def test_gathered_pages_are_head_major_and_contiguous(seed):
    cache = torch.randn(5, 4, 3, 8, dtype=torch.bfloat16)  # [blocks, block_size, kv_heads, dim]
    tables = torch.tensor([[3, 0], [4, 4]], dtype=torch.int32)
    pages = reference._gather_heads_major(cache, tables)
    assert pages.shape == (2, 3, 8, 8) and pages.dtype == torch.float32 and pages.is_contiguous()
    for s, table in enumerate(tables.tolist()):
        for i in range(8):
            expected = cache[table[i // 4], i % 4].float()  # [kv_heads, dim]
            assert torch.equal(pages[s, :, i], expected), (s, i)
