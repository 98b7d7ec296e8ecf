"""Host-side planning for the paged-attention CUDA kernels: pure Python, no GPU needed.

Argument validation (dtype, shape, layout, alignment), the compile-time configuration of each
kernel, split-KV counts and grid shapes live here so they can be unit-tested on a CPU machine.
The numbers mirror the constants at the top of `decode.cu` and `prefill.cu`; change them together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (8, 16, 32)
MAX_DECODE_GROUP = 16  # query heads per kv head the decode kernel serves in one CTA

DECODE_THREADS = 128
DECODE_TILE = 64  # context tokens per online-softmax step; partitions are multiples of it
PREFILL_THREADS = 128
PREFILL_BLOCK_M = 64  # packed (query token, head) rows per prefill CTA

MIN_PARTITION = 256  # shortest context slice worth its own CTA and a merge
MAX_SPLITS = 64
CTAS_PER_SM_TARGET = 4  # enough independent loads in flight to saturate HBM
NO_SPLIT_PARTITION = 1 << 30


@dataclass(slots=True, frozen=True)
class AttentionShapes:
    """Sizes read off validated attention inputs."""

    num_tokens: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_seqs: int
    max_blocks_per_seq: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(slots=True, frozen=True)
class DecodePlan:
    """Launch shape of `omnibus_decode`; `partition_size` tokens per split."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    num_splits: int
    partition_size: int


@dataclass(slots=True, frozen=True)
class PrefillPlan:
    """Launch shape of `omnibus_prefill`: grid.x counts row tiles over the whole batch."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]


ROWS_MODE = 0  # omnibus_decode launch row = flat query token (any batch, exact)
DECODE_MODE = 1  # launch row = sequence; only sequences with q_len == 1 do work


@dataclass(slots=True, frozen=True)
class DecodeLaunch:
    """What `omnibus_decode` is launched over: `launch_rows` rows in `mode`, of which about
    `work_rows` do work (split planning uses it); `max_kv_len` bounds every row's context."""

    mode: int
    launch_rows: int
    work_rows: int
    max_kv_len: int


@dataclass(slots=True, frozen=True)
class PrefillLaunch:
    """`num_tiles` row tiles (exact, or an upper bound the surplus CTAs of which exit);
    `skip_single`: q_len == 1 sequences are left to the decode kernel; `zero_padding`: the kernel
    zeroes the rows past `cu_seqlens_q[-1]`."""

    num_tiles: int
    skip_single: bool
    zero_padding: bool


@dataclass(slots=True, frozen=True)
class AttentionRoute:
    """Which kernels one paged-attention call launches. `zero_from`: the host zeroes
    `out[zero_from:]` (padding rows it knows of)."""

    decode: DecodeLaunch | None
    prefill: PrefillLaunch | None
    zero_from: int | None


def group_bucket(group: int) -> int:
    """Compile-time query-head capacity of a decode CTA: the next power of two >= group."""
    if not 1 <= group <= MAX_DECODE_GROUP:
        raise ValueError(f"decode supports 1..{MAX_DECODE_GROUP} query heads per kv head, got {group}")
    return 1 << (group - 1).bit_length()


def compile_defines(dtype: torch.dtype, head_dim: int, block_size: int, group_max: int = 1) -> tuple[str, ...]:
    """The -D flags that select one kernel configuration in a .cu file."""
    return (
        f"-DOMNIBUS_SCALAR={SUPPORTED_DTYPES[dtype]}",
        f"-DOMNIBUS_HEAD_DIM={head_dim}",
        f"-DOMNIBUS_BLOCK_SIZE={block_size}",
        f"-DOMNIBUS_GROUP_MAX={group_max}",
    )


def plan_decode(
    num_tokens: int, num_kv_heads: int, max_kv_len: int, num_sms: int, *, num_splits: int | None = None,
    launch_rows: int | None = None,
) -> DecodePlan:
    """Split the context across CTAs only when rows x kv heads leave the GPU underfilled.

    `num_tokens` rows do work; `launch_rows` (default `num_tokens`) is grid.x, more when some
    launched rows exit at once (sequences that are not single-token decodes, in decode mode).
    `max_kv_len` is an upper bound on any row's context (exact when the host knows it);
    `num_splits` forces a split count, clamped so that no split is entirely empty.
    """
    launch_rows = num_tokens if launch_rows is None else launch_rows
    if num_tokens < 1 or launch_rows < num_tokens or num_kv_heads < 1 or num_sms < 1:
        raise ValueError(f"empty launch: {num_tokens=} {launch_rows=} {num_kv_heads=} {num_sms=}")
    max_kv_len = max(1, max_kv_len)
    max_tiles = math.ceil(max_kv_len / DECODE_TILE)
    if num_splits is None:
        base = num_tokens * num_kv_heads
        target = CTAS_PER_SM_TARGET * num_sms
        num_splits = 1 if base >= target else min(math.ceil(target / base), max_kv_len // MIN_PARTITION)
        num_splits = max(1, min(num_splits, MAX_SPLITS))
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = min(num_splits, max_tiles)
    if num_splits == 1:
        partition = NO_SPLIT_PARTITION
    else:
        partition = math.ceil(max_tiles / num_splits) * DECODE_TILE
        num_splits = math.ceil(max_kv_len / partition)
        if num_splits == 1:
            partition = NO_SPLIT_PARTITION
    return DecodePlan(
        grid=(launch_rows, num_kv_heads, num_splits),
        block=(DECODE_THREADS, 1, 1),
        num_splits=num_splits,
        partition_size=partition,
    )


def prefill_tiles(query_len: int, group: int) -> int:
    """Row tiles of one sequence: its query tokens x the heads of a GQA group, PREFILL_BLOCK_M a tile."""
    return -(-query_len * group // PREFILL_BLOCK_M)


def plan_prefill(num_tiles: int, num_kv_heads: int) -> PrefillPlan:
    """One CTA per row tile of the batch and kv head."""
    if num_tiles < 1 or num_kv_heads < 1:
        raise ValueError(f"empty launch: {num_tiles=} {num_kv_heads=}")
    if num_tiles >= 1 << 31 or num_kv_heads > 65535:
        raise ValueError(f"grid too large: {num_tiles=} {num_kv_heads=}")
    return PrefillPlan(grid=(num_tiles, num_kv_heads, 1), block=(PREFILL_THREADS, 1, 1))


def route_attention(
    shapes: AttentionShapes, query_lens: list[int] | None, seq_lens: list[int] | None, *, use_tensor_cores: bool = True
) -> AttentionRoute:
    """Pick the kernels for one batch from what the host knows.

    With `query_lens` (host copies of the query lengths): single-token sequences go to the decode
    kernel (split-KV when the GPU would be underfilled), longer chunks to the tensor-core prefill
    kernel, sized by their exact tiles, and the host zeroes any padding rows. Without them the
    composition is unknown: a batch of `num_seqs` tokens (usually all decodes, but possibly an
    empty sequence beside a two-token chunk) runs the exact rows mode of the decode kernel, any
    other batch the prefill kernel over an upper bound of its tiles, zeroing padding itself.
    `use_tensor_cores=False` sends every row through rows mode. `seq_lens` (host copies) tighten
    the decode context bound, else the block-table width bounds it.
    """
    table_bound = shapes.max_blocks_per_seq * shapes.block_size
    if query_lens is not None:
        _check_host_lens("query_lens_cpu", query_lens, shapes.num_seqs)
        total = sum(query_lens)
        _require(total <= shapes.num_tokens, f"query_lens_cpu sums to {total} > num_tokens {shapes.num_tokens}")
    if seq_lens is not None:
        _check_host_lens("seq_lens_cpu", seq_lens, shapes.num_seqs)
    if not use_tensor_cores or query_lens is None and shapes.num_tokens == shapes.num_seqs:
        max_kv_len = max(seq_lens) if seq_lens is not None else table_bound
        rows = DecodeLaunch(ROWS_MODE, shapes.num_tokens, shapes.num_tokens, max_kv_len)
        return AttentionRoute(decode=rows, prefill=None, zero_from=None)
    if query_lens is None:
        bound = prefill_tiles(shapes.num_tokens, shapes.group) + shapes.num_seqs + 1
        return AttentionRoute(decode=None, prefill=PrefillLaunch(bound, False, True), zero_from=None)
    num_decodes = query_lens.count(1)
    decode = prefill = None
    if num_decodes:
        if seq_lens is None:
            max_kv_len = table_bound
        elif num_decodes == len(query_lens):
            max_kv_len = max(seq_lens)
        else:
            max_kv_len = max(n for q, n in zip(query_lens, seq_lens) if q == 1)
        decode = DecodeLaunch(DECODE_MODE, shapes.num_seqs, num_decodes, max_kv_len)
    if num_decodes < len(query_lens):
        tiles = sum(prefill_tiles(q, shapes.group) for q in query_lens if q > 1)
        if tiles:
            prefill = PrefillLaunch(tiles, skip_single=True, zero_padding=False)
    return AttentionRoute(decode=decode, prefill=prefill, zero_from=total if total < shapes.num_tokens else None)


def _check_host_lens(name: str, lens: list[int], num_seqs: int) -> None:
    _require(len(lens) == num_seqs, f"{name} has {len(lens)} entries for {num_seqs} sequences")


def check_slots(max_slot: int, k_cache: torch.Tensor) -> None:
    """Raise IndexError, as the reference's `index_copy_` does, for a slot past the cache."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if max_slot >= num_slots:
        raise IndexError(f"slot_mapping holds slot {max_slot}, but the cache has {num_slots} slots")


def plan_write_kv(row_bytes: int, addresses: tuple[int, ...]) -> tuple[str, int]:
    """Widest copy word every address/stride allows, and the threads for one token's row."""
    for width, name in ((16, "omnibus_write_kv_v16"), (4, "omnibus_write_kv_v4"), (2, "omnibus_write_kv_v2")):
        if all(a % width == 0 for a in (row_bytes, *addresses)):
            words = row_bytes // width
            return name, min(256, max(32, 32 * math.ceil(words / 32)))
    raise ValueError(f"KV rows must be 2-byte aligned, got row_bytes={row_bytes}")


def _require(cond: bool, message: str, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(message)


def _require_int32(name: str, t: torch.Tensor, ndim: int) -> None:
    _require(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}", TypeError)
    _require(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _require(t.is_contiguous(), f"{name} must be contiguous")


def _check_cache(name: str, cache: torch.Tensor) -> None:
    _require(cache.dtype in SUPPORTED_DTYPES, f"{name} must be float16 or bfloat16, got {cache.dtype}", TypeError)
    _require(
        cache.dim() == 4,
        f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(cache.shape)}",
    )
    _require(cache.is_contiguous(), f"{name} must be contiguous")
    _require(cache.data_ptr() % 16 == 0, f"{name} must be 16-byte aligned")


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"inputs are on different devices: {devices}")


def check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
) -> AttentionShapes:
    """Validate paged-attention inputs (docs/CONTRACTS.md) and return their sizes."""
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    _require(
        k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype,
        f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} {v_cache.dtype} differ",
    )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    _require(q.dim() == 3, f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    _require(q.dtype == k_cache.dtype, f"q is {q.dtype} but the cache is {k_cache.dtype}", TypeError)
    num_tokens, num_heads, q_dim = q.shape
    _require(q_dim == head_dim, f"q head_dim {q_dim} != cache head_dim {head_dim}")
    _require(head_dim in SUPPORTED_HEAD_DIMS, f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    _require(
        block_size in SUPPORTED_BLOCK_SIZES, f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}"
    )
    _require(
        num_heads % num_kv_heads == 0, f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    )
    _require(
        q.stride(2) == 1 and q.stride(1) == head_dim and q.stride(0) % 2 == 0 and q.data_ptr() % 4 == 0,
        f"q rows must be contiguous [num_heads, head_dim] (token stride may differ), got strides {q.stride()}",
    )
    _require_int32("block_tables", block_tables, 2)
    _require_int32("seq_lens", seq_lens, 1)
    _require_int32("cu_seqlens_q", cu_seqlens_q, 1)
    num_seqs = seq_lens.shape[0]
    _require(
        block_tables.shape[0] == num_seqs, f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences"
    )
    _require(
        cu_seqlens_q.shape[0] == num_seqs + 1,
        f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries, got {cu_seqlens_q.shape[0]}",
    )
    _same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens,
                 cu_seqlens_q=cu_seqlens_q)
    return AttentionShapes(num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_seqs,
                           block_tables.shape[1])


def check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    """A caller-provided output must be a contiguous, aligned tensor shaped and typed like q."""
    _require(out.dtype == q.dtype, f"out is {out.dtype} but q is {q.dtype}", TypeError)
    _require(out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    _require(out.is_contiguous() and out.data_ptr() % 16 == 0, "out must be contiguous and 16-byte aligned")
    _same_device(out=out, q=q)


def check_write_kv_inputs(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> int:
    """Validate KV-write inputs; returns the bytes of one token's row."""
    _check_cache("k_cache", k_cache)
    _check_cache("v_cache", v_cache)
    _require(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    _, _, num_kv_heads, head_dim = k_cache.shape
    for name, t in (("key", key), ("value", value)):
        _require(t.dtype == k_cache.dtype, f"{name} is {t.dtype} but the cache is {k_cache.dtype}", TypeError)
        _require(
            t.dim() == 3 and tuple(t.shape[1:]) == (num_kv_heads, head_dim),
            f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}], got shape {tuple(t.shape)}",
        )
        _require(
            t.stride(2) == 1 and t.stride(1) == head_dim,
            f"{name} rows must be contiguous [num_kv_heads, head_dim], got strides {t.stride()}",
        )
    _require(key.shape == value.shape, f"key {tuple(key.shape)} != value {tuple(value.shape)}")
    _require(
        slot_mapping.dtype in (torch.int32, torch.int64), f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}",
        TypeError,
    )
    _require(
        slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0],
        f"slot_mapping must be [{key.shape[0]}], got shape {tuple(slot_mapping.shape)}",
    )
    _require(slot_mapping.is_contiguous(), "slot_mapping must be contiguous")
    _same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    return num_kv_heads * head_dim * k_cache.element_size()
