"""The int8 KV cache (`--kv-cache-dtype int8`): its row format, the C++ kernels over it and the pool.

The kernels are checked against the naive float64 reference reading the same int8 numbers (so
the only difference left is float32 rounding), on the same poisoned batches as the float caches:
every slot not holding a live token has a NaN scale, so reading one shows up as NaN.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import int8_kv
from kernels.cpu_ops import CpuAttention
from kernels.reference import paged_attention, paged_attention_naive, write_kv
from tests.test_cpu_kernels import HEADS, extension, kernels, mixed_lens, poisoned_out  # noqa: F401 (fixtures)
from tests.test_reference_kernels import make_batch
from worker_svc.kv_cache import KVCacheSpec, allocate_kv_caches
from worker_svc.swap_space import SwapSpace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def int8_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, **kwargs) -> dict:
    batch = make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, **kwargs)
    batch["k_cache"] = int8_kv.quantize_rows(batch["k_cache"])  # NaN rows: NaN scale, zero values
    batch["v_cache"] = int8_kv.quantize_rows(batch["v_cache"])
    return batch


def run_int8(kernels: CpuAttention, batch: dict) -> torch.Tensor:
    out = kernels.paged_attention(**batch, out=poisoned_out(batch["q"]))
    assert out.dtype == torch.float32
    assert not out.isnan().any(), "a row was left unwritten or an unused slot's scale was read"
    return out


# ---- the row format ----------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 128])
def test_rows_round_trip_within_half_a_step(seed, head_dim):
    torch.manual_seed(seed)
    rows = torch.randn(64, 3, head_dim) * torch.logspace(-3, 3, 64)[:, None, None]
    rows[:, :, :32] *= 50  # an outlier group must not coarsen the row's other groups
    cached = int8_kv.quantize_rows(rows)
    groups = head_dim // 32
    assert cached.dtype == torch.int8 and cached.shape == (64, 3, head_dim + 4 * groups)
    scale = cached[..., head_dim:].contiguous().view(torch.float32)  # [64, 3, groups]
    expected = rows.unflatten(-1, (groups, 32)).abs().amax(-1) / 127
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    error = (int8_kv.dequantize_rows(cached) - rows).abs().unflatten(-1, (groups, 32))
    assert (error <= scale[..., None] * 0.5 * (1 + 1e-6)).all()
    # every group's largest value uses the full range
    assert cached[..., :head_dim].unflatten(-1, (groups, 32)).abs().amax(-1).eq(127).all()


def test_rounding_is_half_to_even_and_special_groups_are_defined():
    rows = torch.zeros(3, 64)
    rows[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5])  # group 0: scale 1
    rows[0, 32:] = 1.0
    rows[1, 32] = float("nan")  # group 1 of row 1 is NaN; group 0 is all zeros
    rows[2] = torch.randn(64)
    cached = int8_kv.quantize_rows(rows)
    assert cached[0, :6].tolist() == [127, 0, 2, 2, 0, -2]  # the ties go to even
    assert cached[0, 32:64].eq(127).all()
    restored = int8_kv.dequantize_rows(cached)
    assert cached[1, :64].eq(0).all() and restored[1, :32].eq(0).all() and restored[1, 32:].isnan().all()
    with pytest.raises(ValueError, match="multiple of 32"):
        int8_kv.quantize_rows(torch.randn(2, 48))


def test_row_width_and_head_dim_of_a_cache():
    assert int8_kv.row_width(64, torch.int8) == 72 and int8_kv.row_width(128, torch.int8) == 144
    assert int8_kv.row_width(64, torch.float16) == 64
    assert int8_kv.head_dim_of(torch.zeros(2, 16, 3, 72, dtype=torch.int8)) == 64
    assert int8_kv.head_dim_of(torch.zeros(2, 16, 3, 64)) == 64


# ---- the kernels -------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_matches_naive(kernels, seed, heads, head_dim):
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    batch = int8_batch(seq_lens, query_lens, *heads, head_dim, 16, share_first_page=True)
    out = run_int8(kernels, batch)
    torch.testing.assert_close(out.double(), paged_attention_naive(**batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, paged_attention(**batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_any_block_size_and_long_contexts(kernels, seed, block_size):
    random.seed(seed)
    seq_lens, query_lens = [4100, 700, 33, 300], [1, 1, 33, 64]
    batch = int8_batch(seq_lens, query_lens, 9, 3, 64, block_size)
    out = run_int8(kernels, batch)
    torch.testing.assert_close(out, paged_attention(**batch), atol=1e-5, rtol=1e-5)


def test_many_decodes_take_the_multi_head_items(kernels, seed):
    """Enough decode rows that each item covers every KV head of its row (ops.cpp plan_items)."""
    random.seed(seed)
    lens = [random.randint(1, 400) for _ in range(24)]
    batch = int8_batch(lens, [1] * len(lens), 9, 3, 64, 16)
    torch.set_num_threads(2)
    try:
        out = run_int8(kernels, batch)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(out.double(), paged_attention_naive(**batch), atol=1e-5, rtol=1e-5)


def test_close_to_the_float32_cache_it_quantizes(kernels, seed):
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    exact = make_batch(seq_lens, query_lens, 9, 3, 64, 16)
    quantized = {**exact, "k_cache": int8_kv.quantize_rows(exact["k_cache"]),
                 "v_cache": int8_kv.quantize_rows(exact["v_cache"])}
    error = (run_int8(kernels, quantized) - paged_attention_naive(**exact).float()).norm(dim=-1)
    assert (error / paged_attention_naive(**exact).float().norm(dim=-1)).max() < 0.05


def test_write_kv_quantizes_exactly_as_the_reference(kernels, seed):
    torch.manual_seed(seed)
    num_blocks, block_size, kvh, d = 6, 8, 3, 64
    shape = (num_blocks, block_size, kvh, d + 8)
    k_cache = torch.randint(-127, 128, shape, dtype=torch.int8)
    v_cache = torch.randint(-127, 128, shape, dtype=torch.int8)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:20]
    slots[torch.randperm(20)[:5]] = -1
    key = torch.randn(20, kvh, d) * torch.logspace(-4, 4, 20)[:, None, None]
    key[0, 0] = 0.0  # a zero row: scale 0, values 0
    key[1, 1, :32] = 0.0
    key[1, 1, 0] = 127.0  # scale 1 for this group, so the next values are ties
    key[1, 1, 1:8] = torch.arange(7) + 0.5
    value = torch.randn(20, 2 * kvh, d)[:, kvh:]  # a strided view, as the model's split gives
    write_kv(key, value, expected_k, expected_v, slots)
    kernels.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    kernels.write_kv(key.half(), value.half(), k_cache, v_cache, slots)  # any float input is upcast first


def test_write_kv_of_a_long_chunk_splits_across_threads_exactly(kernels, seed):
    torch.manual_seed(seed)
    k_cache = torch.zeros(40, 16, 2, 144, dtype=torch.int8)  # head_dim 128: four scales a row
    v_cache = torch.zeros_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(40 * 16)[:600]
    key, value = torch.randn(600, 2, 128) * 3, torch.randn(600, 2, 128)
    key[::7, :, 5] = float("nan")  # NaN groups: NaN scale, zeros
    write_kv(key, value, expected_k, expected_v, slots)
    torch.set_num_threads(2)
    try:
        kernels.write_kv(key, value, k_cache, v_cache, slots)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernels.write_kv(key[..., :32], value[..., :32], k_cache, v_cache, slots)


def test_bad_int8_inputs_raise(kernels, seed):
    random.seed(seed)
    batch = int8_batch([20, 9], [1, 1], 2, 1, 64, 8)
    with pytest.raises(RuntimeError, match="disagree on head_dim"):
        kernels.paged_attention(**{**batch, "k_cache": batch["k_cache"][..., :68].contiguous(),
                                   "v_cache": batch["v_cache"][..., :68].contiguous()})
    with pytest.raises(RuntimeError, match="floating-point"):
        kernels.paged_attention(**{**batch, "q": batch["q"].to(torch.int8)})
    with pytest.raises(RuntimeError, match="or q must be float32"):
        kernels.paged_attention(**{**batch, "q": batch["q"].half()})


# ---- the pool ----------------------------------------------------------------------------------

def test_pool_and_swap_space_hold_int8_rows():
    spec = KVCacheSpec(num_layers=2, block_size=16, num_kv_heads=3, head_dim=64, dtype=torch.int8)
    assert spec.bytes_per_block == 2 * 2 * 16 * 3 * 72  # values and scales, K and V, every layer
    caches = allocate_kv_caches(spec, 4, "cpu")
    assert caches[0][0].shape == (4, 16, 3, 72) and caches[0][0].dtype == torch.int8
    for k, v in caches:
        k.copy_(torch.randint(-127, 128, k.shape, dtype=torch.int8))
        v.copy_(torch.randint(-127, 128, v.shape, dtype=torch.int8))
    saved = [(k.clone(), v.clone()) for k, v in caches]
    swap = SwapSpace(spec, 2, torch.device("cpu"))
    swap.swap_out(caches, [(3, 0), (1, 1)])
    for k, v in caches:
        k.zero_()
        v.zero_()
    swap.swap_in(caches, [(0, 0), (2, 1)])
    for (k, v), (k0, v0) in zip(caches, saved):
        assert torch.equal(k[0], k0[3]) and torch.equal(k[2], k0[1])
        assert torch.equal(v[0], v0[3]) and torch.equal(v[2], v0[1])
