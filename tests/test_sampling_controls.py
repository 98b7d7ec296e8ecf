"""Penalties, logit bias, min_tokens, min-p and logprobs of the worker's sampler, each against an
independent statement of its formula: a per-row plain-torch loop, or transformers' own processor."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from scheduler_svc.protocol import SamplingOptions
from worker_svc.logits_processing import RowHistory, adjust_logits
from worker_svc.logprobs import gather_logprobs
from worker_svc.sampler import Sampler, apply_min_p

VOCAB = 64


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _history(seed: int, num_prompt: int, num_output: int) -> RowHistory:
    rng = torch.Generator().manual_seed(seed)
    # Few distinct ids, so tokens repeat and counts exceed 1.
    return RowHistory(torch.randint(0, 20, (num_prompt + num_output,), generator=rng).tolist(), num_prompt)


def test_presence_and_frequency_penalties_match_the_openai_formula():
    logits = _logits(4)
    options = [SamplingOptions(presence_penalty=p, frequency_penalty=f)
               for p, f in ((0.5, 0.0), (0.0, 0.7), (1.2, -0.4), (0.0, 0.0))]
    histories = [_history(i, 5, 9) for i in range(4)]
    got = adjust_logits(logits, options, histories)
    for row, (o, h) in enumerate(zip(options, histories)):
        counts = torch.bincount(torch.tensor(h.token_ids[h.num_prompt_tokens:]), minlength=VOCAB).float()
        want = logits[row] - o.frequency_penalty * counts - o.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(got[row], want)
    # The prompt does not count: a token only in the prompt keeps its logit.
    only_prompt = set(histories[0].token_ids[:5]) - set(histories[0].token_ids[5:])
    for token in only_prompt:
        assert got[0, token] == logits[0, token]


def test_repetition_penalty_matches_transformers_over_prompt_and_output():
    logits = _logits(3, seed=1)
    penalties = [1.3, 0.8, 1.0]
    options = [SamplingOptions(repetition_penalty=p) for p in penalties]
    histories = [_history(10 + i, 6, 4) for i in range(3)]
    got = adjust_logits(logits, options, histories)
    for row, (p, h) in enumerate(zip(penalties, histories)):
        want = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h.token_ids]), logits[row : row + 1].clone())
        torch.testing.assert_close(got[row : row + 1], want)


def test_logit_bias_is_added_to_the_raw_logits_and_bias_comes_before_penalties():
    logits = _logits(2, seed=2)
    options = [SamplingOptions(logit_bias=((3, 5.0), (7, -100.0))),
               SamplingOptions(logit_bias=((3, 2.5),), repetition_penalty=2.0)]
    history = RowHistory([3, 3, 9], 2)
    got = adjust_logits(logits, options, [history, history])
    want = logits.clone()
    want[0, 3] += 5.0
    want[0, 7] -= 100.0
    biased = logits[1, 3] + 2.5  # then HF's rule on the biased logit of a seen token
    want[1, 3] = biased / 2.0 if biased > 0 else biased * 2.0
    for token in (9,):
        want[1, token] = logits[1, token] / 2.0 if logits[1, token] > 0 else logits[1, token] * 2.0
    torch.testing.assert_close(got, want)
    assert torch.equal(logits, _logits(2, seed=2)), "the raw logits must stay untouched"


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, VOCAB)
    logits[:, 2] = 10.0  # the EOS id is every row's argmax
    eos_and_stop = (2, 5)
    options = [SamplingOptions(min_tokens=3, min_tokens_stop_ids=eos_and_stop)] * 3
    histories = [RowHistory([1, 1, 7], 2), RowHistory([1, 1, 7, 8], 2), RowHistory([1, 1, 7, 8, 9], 2)]
    got = adjust_logits(logits, options, histories)
    for row in (0, 1):  # 1 and 2 tokens generated: both ids masked, nothing else
        assert torch.isneginf(got[row, list(eos_and_stop)]).all()
        assert torch.isfinite(got[row]).sum() == VOCAB - 2
    torch.testing.assert_close(got[2], logits[2])  # 3 generated: min_tokens reached
    tokens = Sampler("cpu", seed=0).sample(logits, options, [3, 4, 5], histories)
    assert tokens[0] != 2 and tokens[1] != 2 and tokens[2] == 2


def test_min_p_keeps_exactly_the_tokens_above_min_p_times_the_top_probability():
    logits = _logits(4, seed=3)
    min_p = torch.tensor([0.0, 0.05, 0.3, 1.0])
    temperature = 0.7
    got = apply_min_p(logits / temperature, min_p.log())
    probs = (logits / temperature).softmax(-1)
    for row in range(4):
        keep = probs[row] >= min_p[row] * probs[row].max()
        assert torch.equal(torch.isfinite(got[row]), keep), row
    options = [SamplingOptions(temperature=temperature, min_p=0.3, seed=s) for s in range(4)]
    allowed = torch.isfinite(apply_min_p(logits / temperature, torch.full((4,), math.log(0.3))))
    sampler = Sampler("cpu", seed=5)
    for position in range(200):
        tokens = sampler.sample(logits, options, [position] * 4)
        assert allowed[torch.arange(4), tokens].all()


def test_greedy_with_penalties_takes_the_argmax_of_the_penalised_logits():
    logits = _logits(2, seed=4)
    top = int(logits[0].argmax())
    options = [SamplingOptions(frequency_penalty=2.0), SamplingOptions()]
    histories = [RowHistory([top] * 10, 1), RowHistory([0], 1)]
    tokens = Sampler("cpu", seed=0).sample(logits, options, [10, 1], histories)
    counts = torch.bincount(torch.tensor([top] * 9), minlength=VOCAB).float()
    assert tokens[0] == int((logits[0] - 2.0 * counts).argmax()) != top
    assert tokens[1] == int(logits[1].argmax())


def test_seeded_rows_with_penalties_are_reproducible():
    logits = _logits(3, seed=6)
    options = [SamplingOptions(temperature=1.0, seed=42, presence_penalty=0.5, top_k=20, min_p=0.01)] * 3
    histories = [_history(i, 3, 3) for i in range(3)]
    first = Sampler("cpu", seed=1).sample(logits, options, [6, 6, 6], histories)
    second = Sampler("cpu", seed=2).sample(logits, options, [6, 6, 6], histories)
    assert torch.equal(first, second)


def test_penalties_without_histories_are_refused():
    with pytest.raises(ValueError, match="^penalties and min_tokens need each row's token history$"):
        adjust_logits(_logits(1), [SamplingOptions(presence_penalty=1.0)], None)


def test_logprobs_are_the_raw_log_softmax_with_the_top_n_on_the_worker():
    logits = _logits(3, seed=8)
    options = [SamplingOptions(logprobs=5), SamplingOptions(), SamplingOptions(logprobs=0, temperature=2.0)]
    sampled = torch.tensor([7, 1, 30])
    got = gather_logprobs(logits, options, sampled)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert got[1] is None
    assert got[0].sampled == pytest.approx(float(reference[0, 7]), abs=1e-5)
    assert got[2].sampled == pytest.approx(float(reference[2, 30]), abs=1e-5)  # temperature plays no part
    values, ids = reference[0].topk(5)
    assert got[0].top_token_ids == ids.tolist()
    assert got[0].top_logprobs == pytest.approx(values.tolist(), abs=1e-5)
    assert got[2].top_token_ids == [] and got[2].top_logprobs == []
    assert gather_logprobs(logits, [SamplingOptions()] * 3, sampled) == []


@pytest.mark.parametrize("presence,frequency", [(1.0, 0.0), (0.0, 1.0)])
def test_a_penalty_of_exactly_one_is_applied(presence, frequency):
    """1.0 is a real penalty for presence and frequency (0 is their no-op), not a skipped row."""
    logits = _logits(1, seed=5)
    history = _history(5, 3, 8)
    got = adjust_logits(logits, [SamplingOptions(presence_penalty=presence, frequency_penalty=frequency)], [history])
    counts = torch.bincount(torch.tensor(history.token_ids[3:]), minlength=VOCAB).float()
    torch.testing.assert_close(got[0], logits[0] - frequency * counts - presence * (counts > 0).float())


def test_half_precision_logits_come_back_float32_with_the_same_adjustments():
    logits = _logits(2, seed=6)
    options = [SamplingOptions(logit_bias=((4, 3.0),), presence_penalty=0.5, frequency_penalty=0.25,
                               repetition_penalty=1.3)] * 2
    histories = [_history(20 + i, 4, 6) for i in range(2)]
    half = logits.half()
    got = adjust_logits(half, options, histories)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, adjust_logits(half.float(), options, histories))


def test_adjustments_hold_under_a_float64_default_dtype():
    """Every tensor built from Python floats takes the logits' dtype, not torch's default."""
    logits = _logits(2, seed=7)
    options = [SamplingOptions(logit_bias=((4, 3.0),), presence_penalty=0.5, frequency_penalty=0.25,
                               repetition_penalty=1.3, min_tokens=5, min_tokens_stop_ids=(2,))] * 2
    histories = [_history(30 + i, 4, 2) for i in range(2)]
    want = adjust_logits(logits, options, histories)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = adjust_logits(logits, options, histories)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
