"""CUDA paged-attention kernels against the torch reference, in fp32 on upcast inputs.

Every check draws fresh random data, poisons outputs (and the allocator's free memory) with NaN,
and fills every cache slot no sequence owns with NaN, so an unwritten output or a read past a
sequence's context shows up as a failure. `assert_close` bounds every (token, head) row's relative
error (`tests/kernel_checks.py`); `tests/test_kernel_emulation.py` runs the same routing and index
maths on CPU and shows the check failing on broken kernels.
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")

from kernels import reference  # noqa: E402
from kernels.cuda_ops import CudaAttention  # noqa: E402
from tests.kernel_checks import (CONTEXT_LENS, HEAD_CONFIGS, TOLERANCE, assert_close, make_batch,  # noqa: E402
                                 prefill_batch, reference_out, row_errors)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ops() -> CudaAttention:
    return CudaAttention()


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed())  # fresh inputs every run; the seed is printed on failure
    print(f"seed {g.initial_seed()}")
    return g


def poison_allocator() -> None:
    """Leave NaN in the caching allocator's free blocks, so unwritten scratch shows up."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def run(ops: CudaAttention, b, **kwargs) -> torch.Tensor:
    poison_allocator()
    out = torch.full_like(b.q, float("nan"))
    result = ops.paged_attention(*b.args(), out=out, **kwargs)
    assert result is out
    torch.cuda.synchronize()
    return out


# -- KV write ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("misaligned", [False, True])
def test_write_kv_is_exact(ops, gen, dtype, slot_dtype, head_dim, misaligned):
    num_tokens, num_kv_heads, num_slots = 77, 3, 40 * 16
    row = num_kv_heads * head_dim
    if misaligned:  # a 2-byte offset view forces the narrow copy path
        storage = torch.empty(num_tokens * row + 1, device="cuda", dtype=dtype)
        key = storage[1:].view(num_tokens, num_kv_heads, head_dim)
        key.copy_(torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen))
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
    else:  # value rows strided, as when split out of a fused qkv projection
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
        value = torch.randn(num_tokens, 2 * row, generator=gen).to("cuda", dtype)[:, :row]
        value = value.view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:9]] = -1
    slot_mapping = slots.to("cuda", slot_dtype)
    k_cache = torch.randn(40, 16, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(40, 16, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, k_ref, v_ref, slot_mapping.long())
    ops.write_kv(key, value, k_cache, v_cache, slot_mapping)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_rejects_slots_past_the_cache(ops, gen, slot_dtype):
    key = torch.randn(6, 2, 64, generator=gen).to("cuda", torch.float16)
    k_cache = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 64, 3, 2], device="cuda", dtype=slot_dtype)
    with pytest.raises(IndexError, match="slot 64, but the cache has 64 slots"):
        ops.write_kv(key, key, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    assert not k_cache.any() and not v_cache.any(), "nothing may be written"


# -- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_scale", [1.0, 8.0])
def test_decode_matches_reference(ops, gen, dtype, heads, head_dim, q_scale):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), *heads, head_dim, dtype, gen, q_scale=q_scale)
    assert_close(run(ops, b, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(32, 8), (9, 3)], ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_decode_block_sizes(ops, gen, dtype, block_size, heads):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), *heads, 128, dtype, gen, block_size=block_size)
    assert_close(run(ops, b, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_scale", [1.0, 8.0])
def test_decode_split_agrees_with_no_split(ops, gen, dtype, q_scale):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, dtype, gen, q_scale=q_scale)
    ref = reference_out(b)
    single = run(ops, b, num_splits=1, **b.hints())
    assert_close(single, ref, dtype)
    for splits in (2, 7, 64):
        split = run(ops, b, num_splits=splits, **b.hints())
        assert_close(split, ref, dtype)
        diff = row_errors(split, single.float()).max().item()
        assert diff < TOLERANCE[dtype] / 2, f"{splits} splits differ from one by {diff:.3e} in some row"


def test_decode_without_host_hints(ops, gen):
    """No host copies: the exact rows mode, the context bounded by the block-table width."""
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 28, 4, 128, torch.bfloat16, gen)
    assert_close(run(ops, b), reference_out(b), torch.bfloat16)


def test_decode_is_bitwise_repeatable(ops, gen):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, torch.bfloat16, gen)
    for splits in (None, 1, 5):
        first = run(ops, b, num_splits=splits, **b.hints())
        for _ in range(3):
            assert torch.equal(run(ops, b, num_splits=splits, **b.hints()), first)


def test_decode_large_batch_long_context(ops, gen):
    lens = torch.randint(1, 4097, (96,), generator=gen).tolist()
    b = make_batch(lens, [1] * len(lens), 32, 8, 128, torch.bfloat16, gen)
    assert_close(run(ops, b, **b.hints()), reference_out(b), torch.bfloat16)


# -- prefill and chunked prefill -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
def test_prefill_matches_reference(ops, gen, dtype, heads, head_dim, tensor_cores):
    b = prefill_batch(heads, head_dim, dtype, gen)
    assert_close(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_large_logits_and_block_sizes(ops, gen, dtype, tensor_cores, block_size):
    b = prefill_batch((32, 8), 128, dtype, gen, block_size=block_size, q_scale=8.0)
    assert_close(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), reference_out(b), dtype)


def test_prefill_without_host_hints(ops, gen):
    b = prefill_batch((9, 3), 128, torch.bfloat16, gen)
    assert_close(run(ops, b), reference_out(b), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [None, 1, 9])
def test_mixed_batch_long_decode_rows(ops, gen, dtype, num_splits):
    """Decode rows beside prefill chunks go to the split decode kernel (None: split as planned)."""
    seqs = [(8190, 1), (0, 200), (3000, 1), (40, 24), (700, 1)]
    b = make_batch([before + n for before, n in seqs], [n for _, n in seqs], 28, 4, 128, dtype, gen)
    assert_close(run(ops, b, num_splits=num_splits, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
@pytest.mark.parametrize("lens", [([5, 7], [0, 2]), ([30, 300, 9, 600], [1, 0, 1, 0]), ([64, 900, 20], [0, 130, 1])],
                         ids=["empty-then-chunk", "empty-among-decodes", "empty-chunk-decode"])
def test_empty_sequences(ops, gen, hints, tensor_cores, lens):
    """cu_seqlens_q [0, 0, 2]: as many tokens as sequences, but not one decode row per sequence."""
    b = make_batch(*lens, 16, 4, 128, torch.bfloat16, gen)
    out = run(ops, b, use_tensor_cores=tensor_cores, **(b.hints() if hints else {}))
    assert_close(out, reference_out(b), torch.bfloat16)


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
@pytest.mark.parametrize("lens", [([1, 70, 513, 8200], [1, 1, 1, 1]), ([40, 3, 130, 2000], [1, 3, 66, 1])],
                         ids=["decodes", "mixed"])
def test_padded_batch(ops, gen, hints, tensor_cores, lens):
    """Rows past cu_seqlens_q[-1] come out as zeros (as in the reference) and read no cache slot."""
    b = make_batch(*lens, 32, 8, 128, torch.bfloat16, gen, num_padding=7)
    out = run(ops, b, use_tensor_cores=tensor_cores, **(b.hints() if hints else {}))
    assert torch.equal(out[-7:], torch.zeros_like(out[-7:]))
    assert_close(out, reference_out(b), torch.bfloat16)


def test_nan_query_row_stays_nan_through_the_merge(ops, gen):
    b = make_batch([5000, 3000], [1, 1], 8, 2, 128, torch.bfloat16, gen)
    b.q[1, 3] = float("nan")
    out = run(ops, b, num_splits=8, **b.hints())
    finite = torch.isfinite(out).all(dim=-1)
    assert out[1, 3].isnan().all() and int(finite.sum()) == finite.numel() - 1


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
def test_prefill_is_bitwise_repeatable(ops, gen, tensor_cores):
    b = prefill_batch((28, 4), 128, torch.bfloat16, gen)
    first = run(ops, b, use_tensor_cores=tensor_cores, **b.hints())
    for _ in range(3):
        assert torch.equal(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), first)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_kernels_follow_torch_stream(ops, gen, kind):
    """The kernels run on torch's current stream: a busy side stream produces the query they read.

    Kernels launched on any other stream would start before the side stream's sleep ends and read
    the NaN the query held before it was copied in.
    """
    if kind == "decode":
        b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, torch.bfloat16, gen)
    else:
        b = make_batch([8190, 300, 60], [1, 100, 1], 32, 8, 128, torch.bfloat16, gen)
    ref = reference_out(b)
    q = torch.full_like(b.q, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of a busy GPU on this stream alone
        q.copy_(b.q)
        out = ops.paged_attention(q, *b.args()[1:], **b.hints()).float()
    side.synchronize()
    assert_close(out, ref, torch.bfloat16)


def test_cpu_tensors_are_rejected(ops, gen):
    b = make_batch([5], [1], 8, 8, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="different devices|CUDA tensors"):
        ops.paged_attention(b.q.cpu(), *b.args()[1:])
