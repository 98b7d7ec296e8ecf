"""Host-side planning and validation of the CUDA kernels, on CPU tensors."""
import math
import re

import numpy as np
import pytest
import torch

from kernels import build_check, cuda_ops
from kernels import launch_plan as lp


def attention_inputs(num_tokens=4, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, num_seqs=4,
                     dtype=torch.bfloat16):
    q = torch.randn(num_tokens, num_heads, head_dim).to(dtype)
    k = torch.randn(10, block_size, num_kv_heads, head_dim).to(dtype)
    v = torch.randn(10, block_size, num_kv_heads, head_dim).to(dtype)
    tables = torch.zeros(num_seqs, 3, dtype=torch.int32)
    seq_lens = torch.full((num_seqs,), 5, dtype=torch.int32)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32)
    return [q, k, v, tables, seq_lens, cu]


def test_valid_inputs_give_shapes():
    shapes = lp.check_attention_inputs(*attention_inputs(num_heads=28, num_kv_heads=4))
    assert (shapes.num_tokens, shapes.num_heads, shapes.num_kv_heads, shapes.head_dim) == (4, 28, 4, 128)
    assert (shapes.block_size, shapes.num_seqs, shapes.max_blocks_per_seq, shapes.group) == (16, 4, 3, 7)


def test_q_may_be_a_strided_slice_of_qkv():
    args = attention_inputs()
    qkv = torch.randn(4, 12 * 128).to(torch.bfloat16)
    args[0] = qkv[:, : 8 * 128].view(4, 8, 128)
    assert lp.check_attention_inputs(*args).num_heads == 8


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (lambda a: a.__setitem__(0, a[0].float()), TypeError, "q is torch.float32 but the cache"),
        (lambda a: a.__setitem__(1, a[1].float()), TypeError, "k_cache must be float16 or bfloat16"),
        (lambda a: a.__setitem__(2, a[2][:, :8].contiguous()), ValueError, "k_cache .* and v_cache .* differ"),
        (lambda a: a.__setitem__(1, a[1].transpose(1, 2)), ValueError, "k_cache must be contiguous"),
        (lambda a: a.__setitem__(0, a[0][:, :, :64]), ValueError, "q head_dim 64 != cache head_dim 128"),
        (lambda a: a.__setitem__(0, a[0].transpose(0, 1)), ValueError, "q rows must be contiguous"),
        (lambda a: a.__setitem__(0, a[0][:, :7]), ValueError, "num_heads 7 is not a multiple of num_kv_heads 2"),
        (lambda a: a.__setitem__(3, a[3].long()), TypeError, "block_tables must be int32"),
        (lambda a: a.__setitem__(4, a[4][:3]), ValueError, "block_tables has 4 rows for 3 sequences"),
        (lambda a: a.__setitem__(5, a[5][:4]), ValueError, "cu_seqlens_q must have num_seqs \\+ 1"),
        (lambda a: a.__setitem__(3, a[3].t().contiguous().t()), ValueError, "block_tables must be contiguous"),
        (lambda a: a.__setitem__(4, a[4][None]), ValueError, "seq_lens must be 1-D"),
    ],
)
def test_bad_attention_inputs_are_named(mutate, exc, message):
    args = attention_inputs()
    mutate(args)
    with pytest.raises(exc, match=message):
        lp.check_attention_inputs(*args)


@pytest.mark.parametrize("head_dim, block_size, message", [(96, 16, "head_dim must be one of"),
                                                            (128, 64, "block_size must be one of")])
def test_unsupported_sizes(head_dim, block_size, message):
    with pytest.raises(ValueError, match=message):
        lp.check_attention_inputs(*attention_inputs(head_dim=head_dim, block_size=block_size))


def test_out_must_match_q():
    q = torch.randn(3, 4, 64).to(torch.float16)
    lp.check_out(torch.empty_like(q), q)
    with pytest.raises(TypeError, match="out is torch.bfloat16"):
        lp.check_out(torch.empty_like(q, dtype=torch.bfloat16), q)
    with pytest.raises(ValueError, match="out shape"):
        lp.check_out(torch.empty(3, 4, 128, dtype=torch.float16), q)


def write_kv_inputs(dtype=torch.float16, slot_dtype=torch.int64):
    key = torch.randn(5, 2, 64).to(dtype)
    cache = torch.zeros(4, 16, 2, 64, dtype=dtype)
    return [key, key.clone(), cache, cache.clone(), torch.arange(5, dtype=slot_dtype)]


def test_write_kv_inputs():
    assert lp.check_write_kv_inputs(*write_kv_inputs()) == 2 * 64 * 2
    assert lp.check_write_kv_inputs(*write_kv_inputs(torch.bfloat16, torch.int32)) == 2 * 64 * 2


@pytest.mark.parametrize(
    "index, replacement, exc, message",
    [
        (0, lambda t: t.float(), TypeError, "key is torch.float32"),
        (1, lambda t: t[:, :1], ValueError, r"value must be \[num_tokens, 2, 64\]"),
        (1, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), ValueError, "value rows must be contiguous"),
        (4, lambda t: t.float(), TypeError, "slot_mapping must be int32 or int64"),
        (4, lambda t: t[:4], ValueError, r"slot_mapping must be \[5\]"),
        (2, lambda t: t.bfloat16(), TypeError, "k_cache .* differ|key is torch.float16 but the cache"),
    ],
)
def test_bad_write_kv_inputs(index, replacement, exc, message):
    args = write_kv_inputs()
    args[index] = replacement(args[index])
    with pytest.raises(exc, match=message):
        lp.check_write_kv_inputs(*args)


def test_group_bucket_rounds_up_to_power_of_two():
    assert [lp.group_bucket(g) for g in (1, 2, 3, 4, 5, 7, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="1..16 query heads per kv head, got 17"):
        lp.group_bucket(17)


def test_compile_defines():
    assert lp.compile_defines(torch.float16, 64, 8, 4) == (
        "-DOMNIBUS_SCALAR=__half", "-DOMNIBUS_HEAD_DIM=64", "-DOMNIBUS_BLOCK_SIZE=8", "-DOMNIBUS_GROUP_MAX=4")


def test_full_gpu_is_not_split():
    plan = lp.plan_decode(num_tokens=256, num_kv_heads=8, max_kv_len=16384, num_sms=132)
    assert plan.num_splits == 1 and plan.grid == (256, 8, 1) and plan.block == (128, 1, 1)
    assert plan.partition_size >= 16384


def test_small_batch_long_context_is_split():
    plan = lp.plan_decode(num_tokens=1, num_kv_heads=8, max_kv_len=16384, num_sms=132)
    assert plan.num_splits > 1 and plan.grid == (1, 8, plan.num_splits)
    assert plan.partition_size % lp.DECODE_TILE == 0 and plan.partition_size >= lp.MIN_PARTITION
    assert (plan.num_splits - 1) * plan.partition_size < 16384 <= plan.num_splits * plan.partition_size


def test_short_context_is_not_split():
    assert lp.plan_decode(num_tokens=1, num_kv_heads=1, max_kv_len=200, num_sms=132).num_splits == 1


@pytest.mark.parametrize("max_kv_len", [1, 63, 64, 65, 1000, 8200, 100000])
@pytest.mark.parametrize("forced", [None, 1, 2, 7, 64])
def test_splits_cover_the_context_without_empty_ones(max_kv_len, forced):
    plan = lp.plan_decode(num_tokens=2, num_kv_heads=2, max_kv_len=max_kv_len, num_sms=132, num_splits=forced)
    assert 1 <= plan.num_splits <= lp.MAX_SPLITS
    assert plan.num_splits * plan.partition_size >= max_kv_len
    assert (plan.num_splits - 1) * plan.partition_size < max_kv_len
    if forced is not None:
        assert plan.num_splits <= forced


def test_forced_split_count_must_be_positive():
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        lp.plan_decode(1, 1, 100, 132, num_splits=0)


def test_prefill_grid_is_flat_over_row_tiles():
    assert lp.prefill_tiles(100, 7) == math.ceil(700 / lp.PREFILL_BLOCK_M) == 11
    assert lp.prefill_tiles(1, 1) == 1 and lp.prefill_tiles(64, 1) == 1 and lp.prefill_tiles(65, 1) == 2
    plan = lp.plan_prefill(num_tiles=11, num_kv_heads=4)
    assert plan.grid == (11, 4, 1) and plan.block == (128, 1, 1)
    with pytest.raises(ValueError, match="empty launch"):
        lp.plan_prefill(0, 4)


def shapes(num_tokens, num_seqs, num_heads=8, num_kv_heads=2, block_size=16, max_blocks_per_seq=10):
    return lp.AttentionShapes(num_tokens, num_heads, num_kv_heads, 128, block_size, num_seqs, max_blocks_per_seq)


def test_route_pure_decode_with_hints():
    route = lp.route_attention(shapes(3, 3), [1, 1, 1], [5, 900, 17])
    assert route == lp.AttentionRoute(decode=lp.DecodeLaunch(lp.DECODE_MODE, 3, 3, 900), prefill=None, zero_from=None)


def test_route_mixed_batch_sends_single_tokens_to_decode():
    route = lp.route_attention(shapes(72, 4), [1, 70, 1, 0], [4000, 70, 9, 30])
    assert route.decode == lp.DecodeLaunch(lp.DECODE_MODE, 4, 2, 4000)  # bound by the decodes' contexts only
    assert route.prefill == lp.PrefillLaunch(num_tiles=lp.prefill_tiles(70, 4), skip_single=True, zero_padding=False)
    assert route.zero_from is None


def test_route_padding_known_on_the_host_is_zeroed_there():
    route = lp.route_attention(shapes(10, 2), [1, 1], None)
    assert route.zero_from == 2 and route.prefill is None
    assert route.decode == lp.DecodeLaunch(lp.DECODE_MODE, 2, 2, 10 * 16)  # no seq_lens: the table bounds it
    assert lp.route_attention(shapes(4, 2), [0, 0], [3, 3]) == lp.AttentionRoute(None, None, zero_from=0)


def test_route_without_hints():
    # num_tokens == num_seqs may still hide an empty sequence beside a chunk: the exact rows mode.
    assert lp.route_attention(shapes(2, 2), None, None) == lp.AttentionRoute(
        decode=lp.DecodeLaunch(lp.ROWS_MODE, 2, 2, 160), prefill=None, zero_from=None)
    route = lp.route_attention(shapes(300, 3), None, [5, 200, 100])
    bound = lp.prefill_tiles(300, 4) + 3 + 1  # each sequence's tiles round up once, padding is one more
    assert route == lp.AttentionRoute(None, lp.PrefillLaunch(bound, skip_single=False, zero_padding=True), None)


@pytest.mark.parametrize("seed", range(20))
def test_prefill_tile_bound_holds_for_any_split_of_the_tokens(seed):
    rng = np.random.default_rng(seed)
    num_seqs, group = int(rng.integers(1, 40)), int(rng.integers(1, 17))
    query_lens = rng.integers(0, 200, num_seqs).tolist()
    num_tokens = sum(query_lens) + int(rng.integers(0, 100))
    route = lp.route_attention(shapes(num_tokens, num_seqs, num_heads=group, num_kv_heads=1), None, None)
    if route.prefill is not None:
        exact = sum(lp.prefill_tiles(n, group) for n in query_lens) + lp.prefill_tiles(num_tokens - sum(query_lens),
                                                                                        group)
        assert exact <= route.prefill.num_tiles


def test_route_rows_mode_on_request():
    route = lp.route_attention(shapes(12, 2), [2, 7], [2, 7], use_tensor_cores=False)
    assert route == lp.AttentionRoute(lp.DecodeLaunch(lp.ROWS_MODE, 12, 12, 7), None, None)


@pytest.mark.parametrize("query_lens, seq_lens, message", [
    ([1, 1, 1], None, "query_lens_cpu has 3 entries for 2 sequences"),
    ([1, 1], [3], "seq_lens_cpu has 1 entries for 2 sequences"),
    ([5, 9], None, "query_lens_cpu sums to 14 > num_tokens 10"),
])
def test_route_rejects_inconsistent_hints(query_lens, seq_lens, message):
    with pytest.raises(ValueError, match=message):
        lp.route_attention(shapes(10, 2), query_lens, seq_lens)


def test_plan_decode_grid_covers_launch_rows():
    plan = lp.plan_decode(2, 8, 16384, 132, launch_rows=9)
    assert plan.grid[:2] == (9, 8) and plan.num_splits > 1
    with pytest.raises(ValueError, match="empty launch"):
        lp.plan_decode(3, 8, 100, 132, launch_rows=2)


def test_write_kv_picks_the_widest_aligned_copy():
    assert lp.plan_write_kv(256, (0, 4096, 512)) == ("omnibus_write_kv_v16", 32)
    assert lp.plan_write_kv(2048, (0, 16))[0] == "omnibus_write_kv_v16"
    assert lp.plan_write_kv(2048, (0, 4))[0] == "omnibus_write_kv_v4"
    assert lp.plan_write_kv(2048, (2, 16))[0] == "omnibus_write_kv_v2"
    with pytest.raises(ValueError, match="2-byte aligned"):
        lp.plan_write_kv(2048, (1,))


# -- the wrappers' argument packing, checked against the kernels' C signatures ------------------

KERNEL_SIGNATURE = re.compile(r'extern "C" __global__ void(?:\s+__launch_bounds__\([^)]*\))?\s+(\w+)\s*\(([^)]*)\)', re.S)


def kernel_signatures() -> dict[str, list[type]]:
    """numpy scalar type each kernel parameter must be packed as, by kernel name (NAME: kv_write macro)."""
    def numpy_type(param: str) -> type:
        if "*" in param:
            return np.uint64
        return {"int": np.int32, "long long": np.int64, "float": np.float32}[param.rsplit(" ", 1)[0].strip()]

    signatures = {}
    for path in build_check.sources():
        for name, params in KERNEL_SIGNATURE.findall(path.read_text().replace("\\\n", " ")):
            signatures[name] = [numpy_type(" ".join(p.split())) for p in params.split(",")]
    return signatures


class RecordingAttention(cuda_ops.CudaAttention):
    """The wrappers with compilation and launches replaced by a log, so they run on CPU tensors."""

    def __init__(self):
        super().__init__()
        self.launches = []

    def _function(self, source, name, defines=()):
        return name

    def _sm_count(self, device):
        return 132

    def _launch(self, fn, device, grid, block, args):
        self.launches.append((fn, grid, block, args))


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_require_cuda", lambda t: None)
    return RecordingAttention()


def assert_matches_signature(name, args):
    expected = kernel_signatures()["NAME" if name.startswith("omnibus_write_kv") else name]
    assert [type(a) for a in args] == expected, f"{name}: packed {[type(a).__name__ for a in args]}"


@pytest.mark.parametrize("hints, mode", [(True, lp.DECODE_MODE), (False, lp.ROWS_MODE)])
def test_decode_arguments_match_the_kernel(recorder, hints, mode):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=2, num_seqs=2)
    tables = torch.zeros(2, 600, dtype=torch.int32)
    cu = torch.arange(3, dtype=torch.int32)
    kwargs = {"query_lens_cpu": [1, 1], "seq_lens_cpu": [9000, 5]} if hints else {}
    recorder.paged_attention(q, k, v, tables, seq_lens, cu, 0.1, num_splits=4, **kwargs)
    (decode, grid, block, args), (merge, mgrid, mblock, margs) = recorder.launches
    assert (decode, merge) == ("omnibus_decode", "omnibus_decode_merge")
    assert grid == (2, 2, 4) and block == (128, 1, 1) and mgrid == (2, 8, 1) and mblock == (128, 1, 1)
    assert_matches_signature(decode, args)
    assert_matches_signature(merge, margs)
    assert args[15] == mode and args[16] == np.float32(0.1 * cuda_ops.LOG2E)  # scale in log2 units
    assert margs[4] == 2 and margs[7] == mode  # the merge walks the same launch rows


def test_prefill_arguments_match_the_kernel(recorder):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=5, num_seqs=2)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1, query_lens_cpu=[3, 2])
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1, use_tensor_cores=False)
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1)
    (prefill, grid, _, args), (rows, rgrid, _, rargs), (bounded, bgrid, _, bargs) = recorder.launches
    assert prefill == "omnibus_prefill" and grid == (2, 2, 1)  # one tile each: 3 and 2 tokens x 4 heads
    assert_matches_signature(prefill, args)
    assert args[7:9] == (2, 5) and args[14:] == (1, 0)  # num_seqs, num_tokens; skip_single, no padding to zero
    assert rows == "omnibus_decode" and rgrid[:2] == (5, 2) and rargs[15] == lp.ROWS_MODE
    assert_matches_signature(rows, rargs)
    assert bounded == "omnibus_prefill" and bgrid == (1 + 2 + 1, 2, 1) and bargs[14:] == (0, 1)


def test_mixed_batch_launches_decode_then_prefill(recorder):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=6, num_seqs=3)
    cu = torch.tensor([0, 1, 5, 6], dtype=torch.int32)
    out = recorder.paged_attention(q, k, v, tables[:3], seq_lens[:3], cu, 0.1, query_lens_cpu=[1, 4, 1],
                                   seq_lens_cpu=[40, 4, 3])
    names = [name for name, *_ in recorder.launches]
    assert names == ["omnibus_decode", "omnibus_prefill"]  # contexts too short to split
    (_, grid, _, args), (_, pgrid, _, pargs) = recorder.launches
    assert grid == (3, 2, 1) and args[10] == 3 and args[15] == lp.DECODE_MODE
    assert pgrid == (1, 2, 1) and pargs[14] == 1
    assert out.shape == q.shape


def test_known_padding_is_zeroed_on_the_host(recorder):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=4, num_seqs=2)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1, out=out, query_lens_cpu=[1, 1])
    assert torch.equal(out[2:], torch.zeros_like(out[2:])) and out[:2].isnan().all()


def test_write_kv_rejects_a_slot_past_the_cache_before_launching(recorder):
    key, value, k_cache, v_cache, _ = write_kv_inputs()
    slots = torch.tensor([0, -1, 63, 64, 5])  # the cache has 4 x 16 slots
    with pytest.raises(IndexError, match="slot_mapping holds slot 64, but the cache has 64 slots"):
        recorder.write_kv(key, value, k_cache, v_cache, slots)
    assert recorder.launches == []


def test_write_kv_checks_one_slot_mapping_once(recorder, monkeypatch):
    """A model passes one slot_mapping to every layer: its check (a device read) runs once."""
    calls = []
    check = lp.check_slots
    monkeypatch.setattr(lp, "check_slots", lambda max_slot, cache: calls.append(max_slot) or check(max_slot, cache))
    key, value, k_cache, v_cache, slots = write_kv_inputs()
    for _ in range(3):
        recorder.write_kv(key, value, k_cache, v_cache, slots)
    assert calls == [4]
    slots[0] = 70  # written in place: checked again
    with pytest.raises(IndexError):
        recorder.write_kv(key, value, k_cache, v_cache, slots)
    recorder.write_kv(key, value, k_cache, v_cache, torch.arange(5))  # another tensor
    assert calls == [4, 70, 4] and len(recorder.launches) == 4


def test_write_kv_arguments_match_the_kernel(recorder):
    key, value, k_cache, v_cache, slots = write_kv_inputs()
    recorder.write_kv(key, value, k_cache, v_cache, slots)
    (name, grid, block, args), = recorder.launches
    assert name == "omnibus_write_kv_v16" and grid == (5, 1, 1)
    assert_matches_signature(name, args)
    assert args[5] == 1 and args[8] == 2 * 64 * 2  # int64 slots, row bytes


def test_empty_batch_launches_nothing(recorder):
    q, k, v, tables, seq_lens, cu = attention_inputs()
    out = recorder.paged_attention(q[:0], k, v, tables[:0], seq_lens[:0], cu[:1], 0.1)
    assert out.shape == (0, 8, 128) and recorder.launches == []
    out = recorder.paged_attention(q, k, v, tables[:0], seq_lens[:0], cu[:1], 0.1)  # rows, but no sequence
    assert torch.equal(out, torch.zeros_like(q)) and recorder.launches == []
