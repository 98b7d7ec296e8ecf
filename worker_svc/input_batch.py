"""Host-side inputs of one step: a flattened varlen batch built with numpy, copied once per array.

Batch order is the order of the scheduled requests (new requests, then cached ones). Only the
per-request work (slicing token ids, copying block tables) loops in Python; everything per token
is vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scheduler_svc.protocol import SamplingOptions
from worker_svc.attention_metadata import AttentionMetadata
from worker_svc.request_state import ScheduledRequest


@dataclass(slots=True)
class InputBatch:
    """Every array the forward pass and the sampler need, still on the host."""

    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [S, max_blocks]
    seq_lens: np.ndarray  # int32 [S]
    cu_seqlens_q: np.ndarray  # int32 [S + 1]
    logits_indices: np.ndarray  # int64 [N]: rows of the last token of each sampling request
    sample_req_ids: list[str]  # [N]
    sample_positions: list[int]  # [N]: index the sampled token will have in its sequence
    sampling: list[SamplingOptions]  # [N]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def model_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `positions` on `device` (no copy on CPU)."""
        return to_device(self.input_ids, device), to_device(self.positions, device)

    def attention_metadata(self, device: torch.device) -> AttentionMetadata:
        """Copy the attention inputs to `device` (no copy on CPU)."""
        query_lens = np.diff(self.cu_seqlens_q)
        return AttentionMetadata(
            slot_mapping=to_device(self.slot_mapping, device),
            block_tables=to_device(self.block_tables, device),
            seq_lens=to_device(self.seq_lens, device),
            cu_seqlens_q=to_device(self.cu_seqlens_q, device),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(self.seq_lens.max()),
            query_lens_cpu=query_lens.tolist(),
            seq_lens_cpu=self.seq_lens.tolist(),
        )


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host-to-device copy of a numpy array; shares its memory on CPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        # Pinned staging lets the copy overlap with the host work that follows.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def prepare_inputs(scheduled: list[ScheduledRequest], block_size: int) -> InputBatch:
    """Flatten the scheduled tokens of every request into one batch."""
    num_seqs = len(scheduled)
    starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=num_seqs)
    query_lens = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    seq_lens = starts + query_lens
    cu_seqlens_q = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=cu_seqlens_q[1:])

    # Position of each token: its offset inside the request's chunk plus the chunk's start.
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
    positions = np.arange(cu_seqlens_q[-1]) + np.repeat(starts - cu_seqlens_q[:-1], query_lens)

    block_tables = _block_tables(scheduled, seq_lens, block_size)
    block_ids = block_tables[seq_of_token, positions // block_size].astype(np.int64)
    slot_mapping = block_ids * block_size + positions % block_size

    input_ids: list[int] = []
    for sched in scheduled:
        input_ids.extend(sched.state.token_ids[sched.start : sched.seq_len])

    sampling_rows = [i for i, s in enumerate(scheduled) if s.samples]
    return InputBatch(
        input_ids=np.asarray(input_ids, dtype=np.int64),
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        seq_lens=seq_lens.astype(np.int32),
        cu_seqlens_q=cu_seqlens_q.astype(np.int32),
        logits_indices=cu_seqlens_q[1:][sampling_rows] - 1,
        sample_req_ids=[scheduled[i].state.req_id for i in sampling_rows],
        sample_positions=[scheduled[i].seq_len for i in sampling_rows],
        sampling=[scheduled[i].state.sampling for i in sampling_rows],
    )


def _block_tables(scheduled: list[ScheduledRequest], seq_lens: np.ndarray,
                  block_size: int) -> np.ndarray:
    # Only the blocks covering each context are sent; padding entries are never read.
    num_blocks = (seq_lens + block_size - 1) // block_size
    tables = np.zeros((len(scheduled), int(num_blocks.max())), dtype=np.int32)
    for row, (sched, n) in enumerate(zip(scheduled, num_blocks.tolist())):
        tables[row, :n] = sched.state.block_table[:n]
    return tables
