"""`prepare_inputs` against a per-token python loop, on random varlen batches (CPU, no model)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from scheduler_svc.protocol import SamplingOptions
from worker_svc.input_batch import prepare_inputs, to_device
from worker_svc.request_state import RequestState, ScheduledRequest

BLOCK_SIZE = 4


def random_batch(rng: random.Random, num_seqs: int) -> list[ScheduledRequest]:
    """Decodes, prefill chunks after some context, fresh prompts; block tables in random order,
    some holding more blocks than this step needs (the scheduler allocates ahead)."""
    free = list(range(200))
    rng.shuffle(free)
    batch = []
    for s in range(num_seqs):
        num_tokens = rng.randint(1, 40)
        num_computed = rng.choice([0, num_tokens - 1, rng.randint(0, num_tokens - 1)])
        num_new = rng.randint(1, num_tokens - num_computed)
        num_blocks = -(-num_tokens // BLOCK_SIZE) + rng.choice([0, 0, 1])
        table = [free.pop() for _ in range(num_blocks)]
        token_ids = [rng.randrange(50_000) for _ in range(num_tokens)]
        state = RequestState(f"r{s}", token_ids, table, num_computed,
                             SamplingOptions(temperature=rng.random(), seed=s))
        batch.append(ScheduledRequest(state, num_new))
    return batch


def naive(batch: list[ScheduledRequest]) -> dict[str, list]:
    out = {name: [] for name in ("ids", "pos", "slots", "seq_lens", "cu", "logits", "req_ids",
                                 "sample_pos", "sampling")}
    out["cu"].append(0)
    for sched in batch:
        state = sched.state
        first = state.num_computed_tokens
        last = first + sched.num_new_tokens  # exclusive
        for i in range(first, last):
            out["ids"].append(state.token_ids[i])
            out["pos"].append(i)
            out["slots"].append(state.block_table[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE)
        out["seq_lens"].append(last)
        out["cu"].append(out["cu"][-1] + sched.num_new_tokens)
        if last == len(state.token_ids):  # the step reaches its last token: it samples
            out["logits"].append(out["cu"][-1] - 1)
            out["req_ids"].append(state.req_id)
            out["sample_pos"].append(last)
            out["sampling"].append(state.sampling)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_prepare_inputs_matches_a_per_token_loop(seed):
    rng = random.Random(seed)
    batch = random_batch(rng, rng.randint(1, 9))
    got = prepare_inputs(batch, BLOCK_SIZE)
    want = naive(batch)
    assert got.input_ids.tolist() == want["ids"]
    assert got.positions.tolist() == want["pos"]
    assert got.slot_mapping.tolist() == want["slots"]
    assert got.seq_lens.tolist() == want["seq_lens"]
    assert got.cu_seqlens_q.tolist() == want["cu"]
    assert got.logits_indices.tolist() == want["logits"]
    assert got.sample_req_ids == want["req_ids"]
    assert got.sample_positions == want["sample_pos"]
    assert got.sampling == want["sampling"]
    assert got.num_tokens == len(want["ids"])
    # Each row holds the blocks covering its context; the widest row sets the width.
    widths = [-(-n // BLOCK_SIZE) for n in want["seq_lens"]]
    assert got.block_tables.shape == (len(batch), max(widths))
    for row, (sched, width) in enumerate(zip(batch, widths)):
        assert got.block_tables[row, :width].tolist() == sched.state.block_table[:width]
    dtypes = [a.dtype for a in (got.input_ids, got.positions, got.slot_mapping, got.logits_indices,
                                got.block_tables, got.seq_lens, got.cu_seqlens_q)]
    assert dtypes == [np.int64] * 4 + [np.int32] * 3


def test_device_inputs_on_the_cpu_share_the_host_arrays():
    batch = [
        ScheduledRequest(RequestState("a", list(range(10, 19)), [7, 3, 5], 3, SamplingOptions()), 6),
        ScheduledRequest(RequestState("b", list(range(5)), [2, 9], 4, SamplingOptions()), 1),
    ]
    inputs = prepare_inputs(batch, BLOCK_SIZE)
    input_ids, positions = inputs.model_inputs(torch.device("cpu"))
    assert input_ids.tolist() == list(range(13, 19)) + [4]
    assert positions.tolist() == [3, 4, 5, 6, 7, 8, 4]
    assert input_ids.data_ptr() == inputs.input_ids.ctypes.data  # no copy on the CPU
    meta = inputs.attention_metadata(torch.device("cpu"))
    assert meta.slot_mapping.tolist() == [31, 12, 13, 14, 15, 20, 36]
    assert meta.block_tables.tolist() == [[7, 3, 5], [2, 9, 0]]
    assert (meta.seq_lens.tolist(), meta.cu_seqlens_q.tolist()) == ([9, 5], [0, 6, 7])
    assert (meta.max_query_len, meta.max_seq_len) == (6, 9)
    assert (meta.query_lens_cpu, meta.seq_lens_cpu) == ([6, 1], [9, 5])
    assert meta.slot_mapping.data_ptr() == inputs.slot_mapping.ctypes.data


def test_to_device_moves_to_the_device_asked_for():
    # "meta" stands in for an accelerator here: anything but the CPU must get a new tensor there.
    array = np.arange(6, dtype=np.int64)
    moved = to_device(array, torch.device("meta"))
    assert (moved.device.type, moved.dtype, moved.shape) == ("meta", torch.int64, (6,))
