"""Workload generators and arrival times: seeded, within their ranges, shaped as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from clients.bench.arrivals import arrival_offsets
from clients.bench.workloads import (
    MIN_TOKEN_ID,
    BenchRequest,
    load_workload,
    random_workload,
    save_workload,
    shared_prefix_workload,
    sharegpt_like_workload,
)

VOCAB = 49152


def test_random_workload_is_seeded_and_within_ranges():
    a = random_workload(200, (8, 32), (4, 16), VOCAB, seed=7)
    assert a == random_workload(200, (8, 32), (4, 16), VOCAB, seed=7)
    assert a != random_workload(200, (8, 32), (4, 16), VOCAB, seed=8)
    assert all(8 <= len(r.prompt_token_ids) <= 32 and 4 <= r.max_tokens <= 16 for r in a)
    assert {len(r.prompt_token_ids) for r in a} >= {8, 32}  # inclusive bounds are reached
    ids = [t for r in a for t in r.prompt_token_ids]
    assert MIN_TOKEN_ID <= min(ids) and max(ids) < VOCAB


def test_sharegpt_like_is_long_tailed_and_clipped():
    requests = sharegpt_like_workload(4000, seed=0, max_input=4096, max_output=4096, vocab_size=VOCAB)
    inputs = np.array([len(r.prompt_token_ids) for r in requests])
    outputs = np.array([r.max_tokens for r in requests])
    assert np.mean(inputs) == pytest.approx(161.31, rel=0.1)
    assert np.mean(outputs) == pytest.approx(337.99, rel=0.1)
    for lengths in (inputs, outputs):
        assert np.percentile(lengths, 99) / np.median(lengths) > 5
        assert np.mean(lengths) > np.median(lengths)  # right skew
    clipped = sharegpt_like_workload(500, seed=0, max_input=256, max_output=128, vocab_size=VOCAB)
    assert all(4 <= len(r.prompt_token_ids) <= 256 and 4 <= r.max_tokens <= 128 for r in clipped)
    assert clipped == sharegpt_like_workload(500, seed=0, max_input=256, max_output=128, vocab_size=VOCAB)


def test_shared_prefix_is_really_shared():
    requests = shared_prefix_workload(20, 64, (8, 16), (4, 8), seed=3, vocab_size=VOCAB)
    prefix = requests[0].prompt_token_ids[:64]
    assert all(r.prompt_token_ids[:64] == prefix for r in requests)
    assert all(72 <= len(r.prompt_token_ids) <= 80 and 4 <= r.max_tokens <= 8 for r in requests)
    suffixes = {tuple(r.prompt_token_ids[64:]) for r in requests}
    assert len(suffixes) == 20


def test_save_load_round_trip_in_the_shared_format(tmp_path):
    requests = random_workload(5, (3, 6), (2, 4), VOCAB, seed=1)
    path = tmp_path / "w.json"
    save_workload(path, requests)
    assert load_workload(path) == requests
    path.write_text('[{"prompt_token_ids": [1001, 1002], "max_tokens": 3}]')
    assert load_workload(path) == [BenchRequest([1001, 1002], 3)]


def test_priority_and_cache_salt_round_trip_and_defaults_stay_out_of_the_file(tmp_path):
    path = tmp_path / "w.json"
    requests = [BenchRequest([1001], 2), BenchRequest([1002], 3, priority=1, cache_salt="tenant-a")]
    save_workload(path, requests)
    assert load_workload(path) == requests
    assert json.loads(path.read_text()) == [
        {"prompt_token_ids": [1001], "max_tokens": 2},
        {"prompt_token_ids": [1002], "max_tokens": 3, "priority": 1, "cache_salt": "tenant-a"},
    ]


def test_all_at_once():
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrival_gaps_have_mean_one_over_rate(burstiness):
    offsets = arrival_offsets(5001, 8.0, burstiness, seed=11)
    assert offsets == arrival_offsets(5001, 8.0, burstiness, seed=11)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.1)
    # Gamma(k, theta): coefficient of variation 1/sqrt(k); burstier arrivals vary more.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.15)


def test_arrivals_reject_bad_parameters():
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 1.0, seed=0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, 0.0, seed=0)
