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


def test_prefill_grid_covers_packed_rows():
    plan = lp.plan_prefill(num_seqs=3, num_kv_heads=4, group=7, max_query_len=100)
    assert plan.grid == (math.ceil(700 / lp.PREFILL_BLOCK_M), 4, 3) and plan.block == (128, 1, 1)
    assert lp.plan_prefill(1, 1, 1, 0).grid == (1, 1, 1)


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


def test_decode_arguments_match_the_kernel(recorder):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=2, num_seqs=2)
    tables = torch.zeros(2, 600, dtype=torch.int32)
    cu = torch.arange(3, dtype=torch.int32)
    recorder.paged_attention(q, k, v, tables, seq_lens, cu, 0.1, num_splits=4)
    (decode, grid, block, args), (merge, mgrid, mblock, margs) = recorder.launches
    assert (decode, merge) == ("omnibus_decode", "omnibus_decode_merge")
    assert grid == (2, 2, 4) and block == (128, 1, 1) and mgrid == (2, 8, 1) and mblock == (128, 1, 1)
    assert_matches_signature(decode, args)
    assert_matches_signature(merge, margs)
    assert args[15] == 1 and args[16] == np.float32(0.1 * cuda_ops.LOG2E)  # decode_only, scale in log2 units


def test_prefill_arguments_match_the_kernel(recorder):
    q, k, v, tables, seq_lens, _ = attention_inputs(num_tokens=5, num_seqs=2)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1, query_lens_cpu=[3, 2])
    recorder.paged_attention(q, k, v, tables[:2], seq_lens[:2], cu, 0.1, use_tensor_cores=False)
    (prefill, grid, _, args), (rows, rgrid, _, rargs) = recorder.launches
    assert prefill == "omnibus_prefill" and grid == (1, 2, 2)
    assert_matches_signature(prefill, args)
    assert rows == "omnibus_decode" and rgrid[:2] == (5, 2) and rargs[15] == 0  # rows path: not decode-only
    assert_matches_signature(rows, rargs)


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
