"""CUDA paged-attention kernels against the torch reference, in fp32 on upcast inputs.

Every check draws fresh random data, poisons outputs (and the allocator's free memory) with NaN,
and fills every cache slot no sequence owns with NaN, so an unwritten output or a read past a
sequence's context shows up as a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")

from kernels import reference  # noqa: E402
from kernels.cuda_ops import CudaAttention  # noqa: E402

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
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


@pytest.fixture(scope="module")
def ops() -> CudaAttention:
    return CudaAttention()


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed())  # fresh inputs every run; the seed is printed on failure
    print(f"seed {g.initial_seed()}")
    return g


def make_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, dtype, gen, *, block_size=16, q_scale=1.0,
               share_page=True) -> Batch:
    """Random paged batch: shuffled block ids, two sequences sharing their first page, NaN in unowned slots."""
    device = "cuda"
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
    num_tokens = sum(query_lens)
    q = (torch.randn(num_tokens, num_heads, head_dim, generator=gen) * q_scale).to(device, dtype)
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    i32 = dict(dtype=torch.int32, device=device)
    return Batch(q, k_cache, v_cache, torch.tensor(tables, **i32), torch.tensor(seq_lens, **i32),
                 torch.tensor(cu, **i32), 1.0 / math.sqrt(head_dim), list(query_lens), list(seq_lens))


def reference_out(b: Batch) -> torch.Tensor:
    k = torch.nan_to_num(b.k_cache.float())  # the reference must not see the poison either
    v = torch.nan_to_num(b.v_cache.float())
    return reference.paged_attention(b.q.float(), k, v, b.block_tables, b.seq_lens, b.cu_seqlens_q, b.scale,
                                     query_lens_cpu=b.query_lens, seq_lens_cpu=b.seq_lens_list)


def poison_allocator() -> None:
    """Leave NaN in the caching allocator's free blocks, so unwritten scratch shows up."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def run(ops: CudaAttention, b: Batch, **kwargs) -> torch.Tensor:
    poison_allocator()
    out = torch.full_like(b.q, float("nan"))
    result = ops.paged_attention(*b.args(), out=out, **kwargs)
    assert result is out
    torch.cuda.synchronize()
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite outputs"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.3e} >= {TOLERANCE[dtype]}"


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


# -- decode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_scale", [1.0, 8.0])
def test_decode_matches_reference(ops, gen, dtype, heads, head_dim, q_scale):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), *heads, head_dim, dtype, gen, q_scale=q_scale)
    assert_close(run(ops, b, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(32, 8), (9, 3)], ids=lambda h: f"h{h[0]}kv{h[1]}")
def test_decode_block_sizes(ops, gen, block_size, heads):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), *heads, 128, torch.bfloat16, gen, block_size=block_size)
    assert_close(run(ops, b, **b.hints()), reference_out(b), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_split_agrees_with_no_split(ops, gen, dtype):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, dtype, gen)
    ref = reference_out(b)
    single = run(ops, b, num_splits=1, **b.hints())
    assert_close(single, ref, dtype)
    for splits in (2, 7, 64):
        split = run(ops, b, num_splits=splits, **b.hints())
        assert_close(split, ref, dtype)
        diff = ((split.float() - single.float()).norm() / single.float().norm()).item()
        assert diff < TOLERANCE[dtype] / 2, f"{splits} splits differ from one by {diff:.3e}"


def test_decode_without_host_hints(ops, gen):
    """No host copies: the decode path is inferred and the context bounded by the block-table width."""
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
    seq_lens = [before + n for before, n in PREFILL_SEQS]
    query_lens = [n for _, n in PREFILL_SEQS]
    b = make_batch(seq_lens, query_lens, *heads, head_dim, dtype, gen)
    assert_close(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), reference_out(b), dtype)


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_large_logits_and_block_sizes(ops, gen, tensor_cores, block_size):
    seq_lens = [before + n for before, n in PREFILL_SEQS]
    query_lens = [n for _, n in PREFILL_SEQS]
    b = make_batch(seq_lens, query_lens, 32, 8, 128, torch.bfloat16, gen, block_size=block_size, q_scale=8.0)
    assert_close(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), reference_out(b), torch.bfloat16)


def test_prefill_without_host_hints(ops, gen):
    seq_lens = [before + n for before, n in PREFILL_SEQS]
    b = make_batch(seq_lens, [n for _, n in PREFILL_SEQS], 9, 3, 128, torch.bfloat16, gen)
    assert_close(run(ops, b), reference_out(b), torch.bfloat16)


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
def test_prefill_is_bitwise_repeatable(ops, gen, tensor_cores):
    seq_lens = [before + n for before, n in PREFILL_SEQS]
    b = make_batch(seq_lens, [n for _, n in PREFILL_SEQS], 28, 4, 128, torch.bfloat16, gen)
    first = run(ops, b, use_tensor_cores=tensor_cores, **b.hints())
    for _ in range(3):
        assert torch.equal(run(ops, b, use_tensor_cores=tensor_cores, **b.hints()), first)


def test_kernels_follow_torch_stream(ops, gen):
    """Work queued on a side stream stays ordered with the torch ops around it."""
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, torch.bfloat16, gen)
    ref = reference_out(b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.paged_attention(*b.args(), **b.hints())
        out = out.float() * 1.0
    side.synchronize()
    assert_close(out, ref, torch.bfloat16)


def test_cpu_tensors_are_rejected(ops, gen):
    b = make_batch([5], [1], 8, 8, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="different devices|CUDA tensors"):
        ops.paged_attention(b.q.cpu(), *b.args()[1:])
