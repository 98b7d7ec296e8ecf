"""The CUDA kernels' launches, emulated on CPU (`tests/kernel_emulation.py`), against the reference.

CI has no GPU: this runs the real host code of `kernels.cuda_ops` (validation, routing, split
planning, argument packing) and executes every launch CTA by CTA from its grid and arguments, so
the routing of decode rows, empty sequences and padding rows, and the index maths of both
kernels, are checked before any GPU run. It also shows that the per-row check of
`tests/kernel_checks.py` fails on deliberately broken kernels that the old global check passes.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from tests.kernel_checks import (CONTEXT_LENS, GLOBAL_TOLERANCE, PREFILL_SEQS, assert_close, global_error,
                                 make_batch, prefill_batch, reference_out, row_errors)
from tests.kernel_emulation import EmulatedAttention, Faults

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture
def gen() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(torch.seed())  # fresh inputs every run; the seed is printed on failure
    print(f"seed {g.initial_seed()}")
    return g


def emulate(b, faults: Faults = Faults(), **kwargs) -> tuple[torch.Tensor, EmulatedAttention]:
    ops = EmulatedAttention(faults)
    out = torch.full_like(b.q, float("nan"))
    assert ops.paged_attention(*b.args(), out=out, **kwargs) is out
    return out, ops


def kernels_launched(ops: EmulatedAttention) -> list[str]:
    return [name for name, _, _ in ops.launches]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_decode_matches_reference(gen, dtype):
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, dtype, gen, device="cpu")
    out, ops = emulate(b, **b.hints())
    assert kernels_launched(ops) == ["omnibus_decode", "omnibus_decode_merge"]
    assert ops.launches[0][1][2] > 1, "this batch should be split"
    assert_close(out, reference_out(b), dtype)


@pytest.mark.parametrize("fault", [Faults(merge_drops_last_split=True), Faults(drop_last_key=True)],
                         ids=["merge-drops-last-split", "drops-last-key"])
def test_per_row_check_catches_what_the_global_norm_misses(fault):
    """Fixed seed: this shows what each check decides on one known input, not kernel accuracy."""
    gen = torch.Generator().manual_seed(0)
    b = make_batch(CONTEXT_LENS, [1] * len(CONTEXT_LENS), 32, 8, 128, BF16, gen, device="cpu")
    ref = reference_out(b)
    good, _ = emulate(b, **b.hints())
    bad, _ = emulate(b, fault, **b.hints())
    assert_close(good, ref, BF16)
    assert global_error(bad, ref) < GLOBAL_TOLERANCE[BF16], "the old check was expected to pass this fault"
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(bad, ref, BF16)
    assert row_errors(bad, ref).max() > 10 * row_errors(good, ref).max()


def test_mixed_batch_sends_decode_rows_to_the_split_decode_kernel(gen):
    seqs = PREFILL_SEQS + [(8190, 1)]  # a long decode row beside the chunks: worth splitting
    b = make_batch([before + n for before, n in seqs], [n for _, n in seqs], 9, 3, 64, BF16, gen, device="cpu")
    out, ops = emulate(b, **b.hints())
    assert kernels_launched(ops) == ["omnibus_decode", "omnibus_decode_merge", "omnibus_prefill"]
    (_, decode_grid, _), _, (_, prefill_grid, _) = ops.launches
    assert decode_grid[:2] == (len(seqs), 3) and decode_grid[2] > 1  # one launch row per sequence
    assert prefill_grid == (sum(-(-n * 3 // 64) for _, n in seqs if n > 1), 3, 1)  # exact tiles, decodes left out
    assert_close(out, reference_out(b), BF16)


def test_prefill_without_hints_sizes_its_grid_by_the_tokens(gen):
    b = prefill_batch((28, 4), 64, torch.float16, gen, device="cpu")
    out, ops = emulate(b)
    (name, grid, _), = ops.launches
    num_tokens, group = b.q.shape[0], 7
    assert name == "omnibus_prefill" and grid == (-(-num_tokens * group // 64) + len(PREFILL_SEQS) + 1, 4, 1)
    assert_close(out, reference_out(b), torch.float16)


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_empty_sequence_beside_a_chunk(gen, hints):
    """cu_seqlens_q [0, 0, 2]: two tokens and two sequences, but not two decodes."""
    b = make_batch([5, 7], [0, 2], 8, 2, 64, BF16, gen, device="cpu")
    out, ops = emulate(b, **(b.hints() if hints else {}))
    assert_close(out, reference_out(b), BF16)
    if not hints:  # the old switch took this batch for two decode rows
        bad, _ = emulate(b, Faults(rows_as_decode_only=True))
        with pytest.raises(AssertionError):
            assert_close(bad, reference_out(b), BF16)


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_empty_sequences_among_decodes(gen, hints):
    b = make_batch([30, 300, 9, 600], [1, 0, 1, 0], 16, 4, 128, BF16, gen, device="cpu")
    out, _ = emulate(b, **(b.hints() if hints else {}))
    assert_close(out, reference_out(b), BF16)


BATCHES = {
    "decodes": ([1, 70, 513], [1, 1, 1]),
    "mixed": ([40, 3, 130], [1, 3, 66]),
}


@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "rows"])
def test_padding_rows_are_zeroed_and_read_nothing(gen, kind, hints, tensor_cores):
    seq_lens, query_lens = BATCHES[kind]
    b = make_batch(seq_lens, query_lens, 8, 2, 64, BF16, gen, num_padding=5, device="cpu")
    kwargs = dict(use_tensor_cores=tensor_cores, **(b.hints() if hints else {}))
    out, ops = emulate(b, **kwargs)
    ref = reference_out(b)
    assert torch.equal(out[-5:], torch.zeros_like(out[-5:]))
    assert_close(out, ref, BF16)
    uses_prefill_padding = "omnibus_prefill" in kernels_launched(ops) and not hints and tensor_cores
    if uses_prefill_padding:
        bad, _ = emulate(b, Faults(prefill_keeps_padding=True), **kwargs)
        with pytest.raises(AssertionError, match="non-finite"):
            assert_close(bad, ref, BF16)
    if not tensor_cores:  # the old rows mode gave padding rows the last sequence's context and more
        bad, _ = emulate(b, Faults(rows_padding_as_last_seq=True), **kwargs)
        with pytest.raises(AssertionError):
            assert_close(bad, ref, BF16)


def test_batch_of_padding_only_is_zeros(gen):
    b = make_batch([4], [1], 8, 8, 64, BF16, gen, device="cpu")
    q = torch.randn(3, 8, 64).to(BF16)
    ops = EmulatedAttention()
    out = ops.paged_attention(q, b.k_cache, b.v_cache, b.block_tables[:0], b.seq_lens[:0], b.cu_seqlens_q[:1],
                              b.scale)
    assert torch.equal(out, torch.zeros_like(q)) and ops.launches == []


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_copies_rows_and_bound_checks_slots(gen, slot_dtype):
    num_tokens, num_kv_heads, head_dim = 21, 2, 64
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(BF16)
    value = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, generator=gen).to(BF16)
    value = value[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)  # strided rows
    k_cache = torch.randn(4, 8, num_kv_heads, head_dim, generator=gen).to(BF16)
    v_cache = torch.randn(4, 8, num_kv_heads, head_dim, generator=gen).to(BF16)
    slots = torch.randperm(32, generator=gen)[:num_tokens]
    slots[::5] = -1
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, k_ref, v_ref, slots)
    ops = EmulatedAttention()
    ops.write_kv(key, value, k_cache, v_cache, slots.to(slot_dtype))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    slots[3] = 32  # one past the last slot
    with pytest.raises(IndexError):
        reference.write_kv(key, value, k_ref.clone(), v_ref.clone(), slots)
    with pytest.raises(IndexError, match="slot_mapping holds slot 32, but the cache has 32 slots"):
        ops.write_kv(key, value, k_cache, v_cache, slots.to(slot_dtype))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "nothing may be written"


def test_a_nan_query_stays_nan_through_the_split_merge(gen):
    """fmaxf drops NaN: the merge must still pass a NaN partial on instead of writing zeros."""
    b = make_batch([5000, 3000], [1, 1], 8, 2, 64, BF16, gen, device="cpu")
    b.q[1, 3] = float("nan")
    out, ops = emulate(b, **b.hints())
    assert ops.launches[0][1][2] > 1, "this batch should be split"
    finite = torch.isfinite(out).all(dim=-1)
    assert out[1, 3].isnan().all() and finite.sum() == finite.numel() - 1  # only that row, head 3
