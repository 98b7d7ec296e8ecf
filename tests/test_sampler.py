"""Sampler tests against naive per-row references (CPU, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler_svc.protocol import SamplingOptions
from worker_svc.sampler import Sampler, apply_top_k_top_p, derive_seed

GREEDY = SamplingOptions()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def _naive_allowed(row: torch.Tensor, opts: SamplingOptions) -> set[int]:
    """The tokens a row may produce, computed one token at a time in float64."""
    values = [float(v) / opts.temperature for v in row]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    if opts.top_k > 0:
        order = order[: opts.top_k]
    top = max(values[i] for i in order)
    weights = [math.exp(values[i] - top) for i in order]
    total = sum(weights)
    allowed, mass = set(), 0.0
    for token, weight in zip(order, weights):
        if mass >= opts.top_p:
            break
        allowed.add(token)
        mass += weight / total
    return allowed


def test_top_p_beyond_the_candidate_window_is_exact() -> None:
    # Over 1024 tokens: a peaked row's nucleus fits the candidate window, a flat row's does not.
    logits = torch.cat([_logits(1, 3000, seed=12, scale=4.0), _logits(1, 3000, seed=13, scale=0.3)])
    opts = [SamplingOptions(temperature=1.0, top_p=0.9), SamplingOptions(temperature=1.0, top_p=0.8)]
    allowed = [_naive_allowed(row, o) for row, o in zip(logits, opts)]
    assert len(allowed[0]) < 1024 < len(allowed[1])
    sampler = Sampler("cpu", seed=14)
    for _ in range(50):
        tokens = sampler.sample(logits, opts, [0, 0]).tolist()
        assert tokens[0] in allowed[0] and tokens[1] in allowed[1]


def test_greedy_rows_equal_argmax_even_in_mixed_batch() -> None:
    logits = _logits(16, 1000)
    sampler = Sampler("cpu", seed=1)
    all_greedy = sampler.sample(logits, [GREEDY] * 16, list(range(16)))
    assert torch.equal(all_greedy, logits.argmax(dim=-1))

    mixed = [GREEDY if i % 2 else SamplingOptions(temperature=1.5) for i in range(16)]
    tokens = sampler.sample(logits, mixed, list(range(16)))
    odd = torch.arange(1, 16, 2)
    assert torch.equal(tokens[odd], logits.argmax(dim=-1)[odd])
    # The sampled rows must not silently be greedy too (flat-ish logits, 8 rows).
    even = torch.arange(0, 16, 2)
    assert not torch.equal(tokens[even], logits.argmax(dim=-1)[even])


def test_top_k_one_is_greedy() -> None:
    logits = _logits(32, 500, seed=3)
    opts = [SamplingOptions(temperature=2.0, top_k=1)] * 16 + [
        SamplingOptions(temperature=0.7, top_k=1, seed=i) for i in range(16)
    ]
    tokens = Sampler("cpu", seed=2).sample(logits, opts, [5] * 32)
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(temperature=1.0, top_k=5),
        SamplingOptions(temperature=0.8, top_p=0.6),
        SamplingOptions(temperature=1.3, top_k=8, top_p=0.7),
        SamplingOptions(temperature=1.0, top_k=3, seed=11),
        SamplingOptions(temperature=2.0, top_p=0.5, seed=12),
    ],
)
def test_top_k_top_p_stay_inside_allowed_set(opts: SamplingOptions) -> None:
    logits = _logits(6, 40, seed=4, scale=1.5)
    allowed = [_naive_allowed(row, opts) for row in logits]
    sampler = Sampler("cpu", seed=5)
    seen: list[set[int]] = [set() for _ in allowed]
    for draw in range(400):
        # Vary the position so seeded rows draw fresh noise every time.
        tokens = sampler.sample(logits, [opts] * 6, [draw] * 6).tolist()
        for row, token in enumerate(tokens):
            assert token in allowed[row], (row, token, allowed[row])
            seen[row].add(token)
    # Not over-restrictive either: every allowed token turns up.
    assert seen == allowed


@pytest.mark.parametrize("num_candidates", [None, 4, 12, 40])
@pytest.mark.parametrize("scale", [3.0, 0.2])  # peaked rows, and flat ones whose nucleus is wide
def test_mask_matches_naive_allowed_set(num_candidates: int | None, scale: float) -> None:
    vocab = 64
    opts = [SamplingOptions(temperature=1.0, top_k=k, top_p=p)
            for k in (0, 1, 7, 30) for p in (1.0, 0.9, 0.5, 0.2, 0.05)]
    logits = _logits(len(opts), vocab, seed=6, scale=scale)
    masked = apply_top_k_top_p(
        logits,
        torch.tensor([o.top_k or vocab for o in opts]),
        torch.tensor([o.top_p for o in opts]),
        num_candidates,
    )
    for row, o in enumerate(opts):
        kept = set(torch.nonzero(masked[row] > float("-inf")).flatten().tolist())
        assert kept == _naive_allowed(logits[row], o), (row, o)
        assert torch.equal(masked[row][list(kept)], logits[row][list(kept)])


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_distribution_matches_softmax(seeded: bool) -> None:
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    temperature = 0.7
    draws = 20000
    logits = base.expand(draws, -1).contiguous()
    if seeded:
        # One seed per row: the per-row generators must also follow the distribution.
        opts = [SamplingOptions(temperature=temperature, seed=i) for i in range(draws)]
    else:
        opts = [SamplingOptions(temperature=temperature)] * draws
    tokens = Sampler("cpu", seed=7).sample(logits, opts, [3] * draws)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    expected = (base.double() / temperature).softmax(dim=-1)
    # 5 standard deviations of a 20000-draw frequency is below 0.018.
    assert torch.allclose(freq, expected, atol=0.018), (freq, expected)


def test_seeded_row_ignores_batch_composition() -> None:
    vocab = 5000
    target = _logits(1, vocab, seed=8, scale=0.5)[0]
    opts = SamplingOptions(temperature=1.0, top_p=0.95, seed=1234)
    alone = Sampler("cpu", seed=1).sample(target[None], [opts], [17]).item()

    others = _logits(5, vocab, seed=9)
    batch = torch.cat([others[:3], target[None], others[3:]])
    batch_opts = [
        SamplingOptions(temperature=1.0),
        GREEDY,
        SamplingOptions(temperature=0.5, seed=99, top_k=50),
        opts,
        SamplingOptions(temperature=1.0, seed=1234),  # same seed, other position
        SamplingOptions(temperature=2.0),
    ]
    positions = [4, 8, 17, 17, 18, 2]
    for sampler_seed in (2, 3):
        tokens = Sampler("cpu", seed=sampler_seed).sample(batch, batch_opts, positions)
        assert tokens[3].item() == alone


def test_different_seeds_and_positions_differ() -> None:
    vocab = 5000
    logits = _logits(1, vocab, seed=10, scale=0.1).expand(64, -1).contiguous()
    sampler = Sampler("cpu", seed=1)
    by_seed = sampler.sample(logits, [SamplingOptions(temperature=1.0, seed=s) for s in range(64)],
                             [0] * 64)
    by_position = sampler.sample(logits, [SamplingOptions(temperature=1.0, seed=5)] * 64,
                                 list(range(64)))
    # Near-uniform over 5000 tokens: 64 draws collide only a handful of times.
    assert len(set(by_seed.tolist())) > 55
    assert len(set(by_position.tolist())) > 55
    assert derive_seed(5, 1) != derive_seed(1, 5)


def test_unseeded_sampler_generators_differ_between_instances() -> None:
    logits = _logits(1, 5000, seed=11, scale=0.1).expand(32, -1).contiguous()
    opts = [SamplingOptions(temperature=1.0)] * 32
    first = Sampler("cpu").sample(logits, opts, [0] * 32)
    second = Sampler("cpu").sample(logits, opts, [0] * 32)
    assert not torch.equal(first, second)


def test_empty_batch() -> None:
    tokens = Sampler("cpu", seed=0).sample(torch.empty(0, 10), [], [])
    assert tokens.shape == (0,) and tokens.dtype == torch.int64
