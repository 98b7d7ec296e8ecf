"""A CPU emulation of the CUDA paged-attention kernels, one CTA at a time, behind the real wrappers.

`EmulatedAttention` is `kernels.cuda_ops.CudaAttention` with compilation and launches replaced:
the real host code validates, routes, plans and packs the arguments, and each launch is executed
here from its grid and its packed arguments alone. Pointers are resolved to flat views of the
memory they point into, and every CTA does the index arithmetic of its `.cu` source (which row,
which sequence, which keys, which partial slot, which output bytes), written out again from the
C++ by hand. Each CTA's arithmetic is vectorised in float32 with the kernels' rounding points
(inputs in the cache dtype, fp32 softmax in the log2 domain, P rounded to the cache dtype before
the tensor-core PV product, outputs rounded); the only liberty taken is that the prefill kernel's
P is rounded against the row's final maximum rather than the running one (the same relative
rounding). It cannot find a race or a wrong fragment layout; it does check the launch shapes and
the index maths, and lets the GPU tests' checks be shown to fail on broken variants (`Faults`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch

from kernels import cuda_ops
from kernels import launch_plan as lp

NEG_INF = -math.inf


@dataclass(slots=True, frozen=True)
class Faults:
    """Deliberate bugs, to show that a check catches them."""

    merge_drops_last_split: bool = False  # the merge ignores the last split
    drop_last_key: bool = False  # decode rows longer than one tile skip their last key
    prefill_keeps_padding: bool = False  # the prefill kernel leaves padding rows unwritten
    # The two bugs of the previous rows mode: a batch of num_seqs tokens taken as one decode row
    # per sequence (seq = token), and padding rows attributed to the last sequence.
    rows_as_decode_only: bool = False
    rows_padding_as_last_seq: bool = False


def flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of the memory from `t`'s first element to the end of its storage, in `t`'s dtype."""
    storage = t.untyped_storage()
    offset = t.data_ptr() - storage.data_ptr()
    assert offset % t.element_size() == 0
    count = (storage.nbytes() - offset) // t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(storage, offset // t.element_size(), (count,), (1,))


class EmulatedAttention(cuda_ops.CudaAttention):
    """The CUDA wrappers running on CPU tensors, launches emulated CTA by CTA."""

    def __init__(self, faults: Faults = Faults(), num_sms: int = 132):
        super().__init__()
        self.faults = faults
        self.num_sms = num_sms
        self.launches: list[tuple[str, tuple, tuple[str, ...]]] = []
        self._memory: dict[int, torch.Tensor] = {}

    # -- the wrappers, with pointers recorded so that launches can find their memory ----------

    def paged_attention(self, *args, **kwargs):
        with self._on_cpu():
            return super().paged_attention(*args, **kwargs)

    def write_kv(self, *args, **kwargs):
        with self._on_cpu():
            return super().write_kv(*args, **kwargs)

    def _on_cpu(self):
        def record(t: torch.Tensor) -> np.uint64:
            self._memory[t.data_ptr()] = t
            return np.uint64(t.data_ptr())

        patches = mock.patch.multiple(cuda_ops, _ptr=record, _require_cuda=lambda t: None)
        return patches

    def _function(self, source, name, defines=()):
        return name, defines

    def _sm_count(self, device):
        return self.num_sms

    def _launch(self, fn, device, grid, block, args) -> None:
        name, defines = fn
        self.launches.append((name, grid, defines))
        config = dict(d.removeprefix("-DOMNIBUS_").split("=") for d in defines)
        mem = [flat(self._memory[int(a)]) if isinstance(a, np.uint64) else a.item() for a in args]
        if name == "omnibus_decode":
            self._emulate_decode(grid, mem, int(config["HEAD_DIM"]), int(config["BLOCK_SIZE"]), int(config["GROUP_MAX"]))
        elif name == "omnibus_decode_merge":
            self._emulate_merge(grid, mem, int(config["HEAD_DIM"]))
        elif name == "omnibus_prefill":
            self._emulate_prefill(grid, mem, int(config["HEAD_DIM"]), int(config["BLOCK_SIZE"]))
        elif name.startswith("omnibus_write_kv"):
            self._emulate_write_kv(grid, mem)
        else:
            raise AssertionError(f"unknown kernel {name}")

    # -- decode.cu ---------------------------------------------------------------------------

    def _emulate_decode(self, grid, mem, D, BS, GMAX) -> None:
        (out, part_out, part_lse, q, k_cache, v_cache, block_tables, seq_lens, cu, num_seqs, num_rows, num_heads,
         num_kv_heads, max_blocks, q_stride, mode, scale_log2, partition) = mem
        assert grid[0] == num_rows, "grid.x must be num_rows"
        group = num_heads // num_kv_heads
        assert group <= GMAX, f"group {group} > OMNIBUS_GROUP_MAX {GMAX}"
        num_splits = grid[2]
        for launch_row in range(grid[0]):
            if mode == lp.DECODE_MODE:
                seq, token = launch_row, int(cu[launch_row])
                if int(cu[seq + 1]) - token != 1:
                    continue
                kv_len = int(seq_lens[seq])
            elif self.faults.rows_as_decode_only:
                token = seq = launch_row
                kv_len = int(seq_lens[seq])
            else:
                token = launch_row
                if token >= int(cu[num_seqs]) and not self.faults.rows_padding_as_last_seq:
                    seq, kv_len = -1, 0
                else:
                    seq = find_seq(cu, num_seqs, token)
                    kv_len = int(seq_lens[seq]) - (int(cu[seq + 1]) - 1 - token)
            if self.faults.drop_last_key and kv_len > lp.DECODE_TILE:
                kv_len -= 1
            for kvh in range(grid[1]):
                head0 = kvh * group
                out_row = token * num_heads + head0
                for split in range(num_splits):
                    begin = split * partition
                    end = min(kv_len, begin + partition)
                    part_row = (split * num_rows + launch_row) * num_heads + head0
                    if begin >= end:
                        if num_splits > 1:
                            part_lse[part_row:part_row + group] = NEG_INF
                        else:
                            out[out_row * D:(out_row + group) * D] = 0
                        continue
                    q_rows = torch.stack([q[token * q_stride + (head0 + g) * D:][:D] for g in range(group)])
                    qs = q_rows.float() * np.float32(scale_log2)
                    positions = torch.arange(begin, end)
                    pages = block_tables[seq * max_blocks + positions // BS].long()
                    offsets = ((pages * BS + positions % BS) * num_kv_heads + kvh) * D
                    index = offsets[:, None] + torch.arange(D)
                    keys, values = k_cache[index].float(), v_cache[index].float()
                    scores = qs @ keys.T  # [group, keys], log2 domain
                    m = scores.max(dim=1).values
                    p = torch.exp2(scores - m[:, None])
                    l = p.sum(dim=1)
                    o = (p @ values) / l[:, None]
                    if num_splits == 1:
                        out[out_row * D:(out_row + group) * D] = o.reshape(-1).to(out.dtype)
                    else:
                        part_out[part_row * D:(part_row + group) * D] = o.reshape(-1)
                        part_lse[part_row:part_row + group] = m + torch.log2(l)

    def _emulate_merge(self, grid, mem, D) -> None:
        out, part_out, part_lse, cu, num_rows, num_heads, num_splits, mode = mem
        assert grid[0] == num_rows and grid[1] == num_heads
        split_rows = num_rows * num_heads
        used = num_splits - 1 if self.faults.merge_drops_last_split else num_splits
        for launch_row in range(grid[0]):
            token = launch_row
            if mode == lp.DECODE_MODE:
                token = int(cu[launch_row])
                if int(cu[launch_row + 1]) - token != 1:
                    continue
            for head in range(grid[1]):
                row = launch_row * num_heads + head
                lse = torch.stack([part_lse[s * split_rows + row] for s in range(used)])
                o = torch.zeros(D)  # no split saw a key
                if lse.isnan().any():
                    o = torch.full((D,), math.nan)
                elif lse.max() != NEG_INF:
                    mx, num, den = lse.max(), torch.zeros(D), torch.tensor(0.0)
                    for s in range(used):
                        if lse[s] == NEG_INF:
                            continue
                        w = torch.exp2(lse[s] - mx)
                        den = den + w
                        num = num + w * part_out[(s * split_rows + row) * D:][:D]
                    o = num / den
                dst = (token * num_heads + head) * D
                out[dst:dst + D] = o.to(out.dtype)

    # -- prefill.cu --------------------------------------------------------------------------

    def _emulate_prefill(self, grid, mem, D, BS) -> None:
        (out, q, k_cache, v_cache, block_tables, seq_lens, cu, num_seqs, num_tokens, num_heads, num_kv_heads,
         max_blocks, q_stride, scale_log2, skip_single, zero_padding) = mem
        group = num_heads // num_kv_heads
        block_m = lp.PREFILL_BLOCK_M
        for tile in range(grid[0]):
            seq, row0 = find_row_tile(cu, num_seqs, num_tokens, group, skip_single, zero_padding, tile)
            for kvh in range(grid[1]):
                if seq < 0:
                    continue
                if seq == num_seqs:
                    if not self.faults.prefill_keeps_padding:
                        first = int(cu[num_seqs])
                        for r in range(row0, min(row0 + block_m, (num_tokens - first) * group)):
                            orow = (first + r // group) * num_heads + kvh * group + r % group
                            out[orow * D:(orow + 1) * D] = 0
                    continue
                self._prefill_tile(out, q, k_cache, v_cache, block_tables, seq_lens, cu, seq, row0, kvh, group,
                                   num_heads, num_kv_heads, max_blocks, q_stride, scale_log2, D, BS)

    @staticmethod
    def _prefill_tile(out, q, k_cache, v_cache, block_tables, seq_lens, cu, seq, row0, kvh, group, num_heads,
                      num_kv_heads, max_blocks, q_stride, scale_log2, D, BS) -> None:
        q_begin = int(cu[seq])
        q_len = int(cu[seq + 1]) - q_begin
        num_rows = q_len * group
        assert 0 <= row0 < num_rows, f"tile row {row0} outside sequence {seq}'s {num_rows} rows"
        ctx_before = int(seq_lens[seq]) - q_len
        last_token = (min(num_rows, row0 + lp.PREFILL_BLOCK_M) - 1) // group
        kv_end = ctx_before + last_token + 1
        rows = torch.arange(row0, min(num_rows, row0 + lp.PREFILL_BLOCK_M))
        tokens, heads = q_begin + rows // group, kvh * group + rows % group
        q_index = (tokens * q_stride + heads * D)[:, None] + torch.arange(D)
        qf = q[q_index].float()
        positions = torch.arange(kv_end)
        pages = block_tables[seq * max_blocks + positions // BS].long()
        offsets = ((pages * BS + positions % BS) * num_kv_heads + kvh) * D
        kv_index = offsets[:, None] + torch.arange(D)
        keys, values = k_cache[kv_index].float(), v_cache[kv_index].float()
        scores = (qf @ keys.T) * np.float32(scale_log2)
        visible = positions[None, :] <= (ctx_before + rows // group)[:, None]
        scores = scores.masked_fill(~visible, NEG_INF)
        m = scores.max(dim=1).values
        p = torch.exp2(scores - m[:, None])
        l = p.sum(dim=1)
        o = (p.to(q.dtype).float() @ values) / l[:, None]  # P enters the tensor cores in the cache dtype
        o_index = ((tokens * num_heads + heads) * D)[:, None] + torch.arange(D)
        out[o_index] = o.to(out.dtype)

    # -- kv_write.cu -------------------------------------------------------------------------

    def _emulate_write_kv(self, grid, mem) -> None:
        key, value, k_cache, v_cache, slot_mapping, slot_is_int64, key_stride, value_stride, row_bytes = mem
        as_bytes = [t.view(torch.uint8) for t in (key, value, k_cache, v_cache)]
        key_b, value_b, k_b, v_b = as_bytes
        for token in range(grid[0]):
            slot = int(slot_mapping[token])
            if slot < 0:
                continue
            k_b[slot * row_bytes:(slot + 1) * row_bytes] = key_b[token * key_stride:][:row_bytes]
            v_b[slot * row_bytes:(slot + 1) * row_bytes] = value_b[token * value_stride:][:row_bytes]


def find_seq(cu: torch.Tensor, num_seqs: int, token: int) -> int:
    """decode.cu's find_seq: the last s with cu_seqlens_q[s] <= token."""
    lo, hi = 0, num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(cu[mid]) <= token:
            lo = mid
        else:
            hi = mid - 1
    return lo


def find_row_tile(cu, num_seqs, num_tokens, group, skip_single, zero_padding, tile) -> tuple[int, int]:
    """prefill.cu's find_row_tile, as the sequential sum its block-wide scan computes."""
    start = 0
    for s in range(num_seqs + (1 if zero_padding else 0)):
        q_len = (int(cu[s + 1]) if s < num_seqs else num_tokens) - int(cu[s])
        count = 0 if skip_single and q_len == 1 and s < num_seqs else -(-q_len * group // lp.PREFILL_BLOCK_M)
        if count > 0 and start <= tile < start + count:
            return s, (tile - start) * lp.PREFILL_BLOCK_M
        start += count
    return -1, 0
