"""The C++ CPU kernels (kernels/cpu) against the naive float64 reference, on every ISA this CPU runs.

Inputs come from `make_batch`: fresh seeds, every slot not holding a live token NaN (so an
unused slot of a last page, or a padding entry of a block table, that is read shows up), shuffled
non-contiguous block tables, optionally two sequences sharing a page.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.cpu_ops import CpuAttention, build_extension
from kernels.reference import paged_attention, paged_attention_naive, write_kv
from tests.test_reference_kernels import make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDGE_LENS = [513, 512, 1, 15, 16, 17, 511]  # the first two share a page
HEADS = [(9, 3), (8, 8), (32, 8), (16, 1)]


@pytest.fixture(scope="module")
def extension():
    return build_extension()


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def kernels(request, extension) -> CpuAttention:
    if request.param not in extension.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return CpuAttention(extension, request.param)


def poisoned_out(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape, float("nan"), dtype=q.dtype)


def run_kernel(kernels: CpuAttention, batch: dict) -> torch.Tensor:
    out = kernels.paged_attention(**batch, out=poisoned_out(batch["q"]))
    assert not out.isnan().any(), "a row was left unwritten or NaN leaked from an unused slot"
    return out


def assert_matches_naive(out: torch.Tensor, batch: dict, atol=1e-5, rtol=1e-5) -> None:
    torch.testing.assert_close(out.double(), paged_attention_naive(**batch), atol=atol, rtol=rtol)


def mixed_lens(block_size: int) -> tuple[list[int], list[int]]:
    """Decodes at every edge length, chunks after cached context, fresh prefills, interleaved."""
    seq_lens = EDGE_LENS + [3 * block_size + 12, 20, 40, 70]
    query_lens = [1] * len(EDGE_LENS) + [9, 20, 40, 31]
    return seq_lens, query_lens


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_matches_naive(kernels, seed, heads, head_dim):
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    batch = make_batch(seq_lens, query_lens, *heads, head_dim, 16, share_first_page=True)
    assert_matches_naive(run_kernel(kernels, batch), batch)


@pytest.mark.parametrize("head_dim", [48, 80])
def test_head_dims_with_a_partial_register_chunk(kernels, seed, head_dim):
    """head_dim / vector width not a multiple of the accumulators' chunk: a one-vector tail."""
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    batch = make_batch(seq_lens, query_lens, 9, 3, head_dim, 16, share_first_page=True)
    assert_matches_naive(run_kernel(kernels, batch), batch)


@pytest.mark.parametrize("block_size", [1, 7, 8, 32])
def test_any_block_size(kernels, seed, block_size):
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(block_size)
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, block_size, share_first_page=True)
    assert_matches_naive(run_kernel(kernels, batch), batch)


@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((32, 8), 128)])
def test_long_contexts(kernels, seed, heads, head_dim):
    random.seed(seed)
    seq_lens, query_lens = [4097, 4200, 4160], [1, 70, 1]  # decodes and a chunk past 4096
    batch = make_batch(seq_lens, query_lens, *heads, head_dim, 16)
    assert_matches_naive(run_kernel(kernels, batch), batch)


def test_long_prefill_of_one_sequence(kernels, seed):
    """A 600-token fresh prefill: many row tiles, each with its own causal limit."""
    random.seed(seed)
    batch = make_batch([600], [600], 9, 3, 64, 16)
    assert_matches_naive(run_kernel(kernels, batch), batch)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_caches_accumulate_in_float32(kernels, seed, dtype, atol):
    random.seed(seed)
    seq_lens, query_lens = [300, 50, 17, 513], [1, 50, 4, 1]
    batch = make_batch(seq_lens, query_lens, 8, 2, 64, 16, dtype=dtype)
    out = run_kernel(kernels, batch)
    assert out.dtype == dtype
    # One rounding of the output on top of an exact computation from the same (rounded) inputs.
    assert_matches_naive(out, batch, atol=atol, rtol=atol / 2)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_float32_queries_over_a_16_bit_cache(kernels, seed, cache_dtype):
    """--kv-cache-dtype under a float32 model: q and out stay float32, only K/V are 16-bit."""
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, 16)
    batch["k_cache"], batch["v_cache"] = batch["k_cache"].to(cache_dtype), batch["v_cache"].to(cache_dtype)
    out = run_kernel(kernels, batch)
    assert out.dtype == torch.float32
    # Exact but for float32 rounding, given the cache's (rounded) values: the naive reference reads
    # the same 16-bit numbers.
    assert_matches_naive(out, batch)
    torch.testing.assert_close(out, paged_attention(**batch), atol=1e-5, rtol=1e-5)


def test_query_may_be_a_strided_slice_of_fused_qkv(kernels, seed):
    random.seed(seed)
    seq_lens, query_lens = [33, 5, 64], [1, 5, 20]
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, 16)
    tokens = batch["q"].shape[0]
    fused = torch.randn(tokens, (9 + 2 * 3) * 64)
    q = fused[:, : 9 * 64].view(tokens, 9, 64)
    q.copy_(batch["q"])
    assert not q.is_contiguous()
    out = kernels.paged_attention(**{**batch, "q": q})
    assert_matches_naive(out, batch)


def test_padding_rows_are_zeroed(kernels, seed):
    random.seed(seed)
    batch = make_batch([5, 9], [1, 1], 2, 1, 64, 8)
    batch["q"] = torch.cat([batch["q"], torch.full((3, 2, 64), float("nan"))])
    out = run_kernel(kernels, batch)
    assert torch.equal(out[2:], torch.zeros(3, 2, 64))
    torch.testing.assert_close(out[:2].double(), paged_attention_naive(**batch)[:2], atol=1e-5, rtol=1e-5)


def test_empty_sequence_in_a_batch(kernels, seed):
    """cu_seqlens_q [0, 0, 2]: the first sequence has no query rows this step."""
    random.seed(seed)
    batch = make_batch([7, 30], [1, 2], 4, 2, 64, 8)
    batch["cu_seqlens_q"] = torch.tensor([0, 0, 2], dtype=torch.int32)
    batch["q"] = batch["q"][:2]
    out = run_kernel(kernels, batch)
    torch.testing.assert_close(out.double(), paged_attention_naive(**batch), atol=1e-5, rtol=1e-5)


def test_isas_agree_with_the_torch_reference(extension, seed):
    random.seed(seed)
    seq_lens, query_lens = mixed_lens(16)
    batch = make_batch(seq_lens, query_lens, 9, 3, 64, 16)
    expected = paged_attention(**batch)
    for isa in extension.supported_isas():
        out = CpuAttention(extension, isa).paged_attention(**batch)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise(kernels, seed):
    random.seed(seed)
    batch = make_batch([20, 9], [1, 1], 2, 1, 64, 8)
    bad_table = batch["block_tables"].clone()
    bad_table[1, 0] = batch["k_cache"].shape[0]
    with pytest.raises(RuntimeError, match="block id"):
        kernels.paged_attention(**{**batch, "block_tables": bad_table})
    with pytest.raises(RuntimeError, match="query length"):
        kernels.paged_attention(**{**batch, "cu_seqlens_q": torch.tensor([0, 1, 12], dtype=torch.int32)})
    with pytest.raises(RuntimeError, match="int32"):
        kernels.paged_attention(**{**batch, "seq_lens": batch["seq_lens"].long()})
    with pytest.raises(RuntimeError, match="or q must be float32"):
        kernels.paged_attention(**{**batch, "q": batch["q"].double()})
    with pytest.raises(RuntimeError, match="or q must be float32"):
        kernels.paged_attention(**{**batch, "q": batch["q"].half(), "k_cache": batch["k_cache"].bfloat16(),
                                   "v_cache": batch["v_cache"].bfloat16()})
    with pytest.raises(RuntimeError, match="k_cache and v_cache must share a dtype"):
        kernels.paged_attention(**{**batch, "v_cache": batch["v_cache"].half()})


def test_write_kv_is_exact(kernels, seed):
    num_blocks, block_size, kvh, d = 6, 8, 3, 16
    k_cache = torch.randn(num_blocks, block_size, kvh, d)
    v_cache = torch.randn(num_blocks, block_size, kvh, d)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:20]
    slots[torch.randperm(20)[:5]] = -1
    key = torch.randn(20, kvh, d)
    value = torch.randn(20, 2 * kvh, d)[:, kvh:]  # a strided view, as the model's split gives
    write_kv(key, value, expected_k, expected_v, slots)
    kernels.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)
    with pytest.raises(IndexError, match="outside the cache"):
        kernels.write_kv(key[:1], value[:1], k_cache, v_cache, torch.tensor([num_blocks * block_size]))


def test_write_kv_casts_to_the_cache_dtype(kernels, seed):
    k_cache = torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16)
    key, value = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    kernels.write_kv(key, value, k_cache, v_cache, torch.tensor([5, -1]))
    assert torch.equal(k_cache[1, 1], key[0].bfloat16())
    assert torch.count_nonzero(k_cache) == torch.count_nonzero(key[0].bfloat16())
    assert torch.equal(v_cache[1, 1], value[0].bfloat16())
