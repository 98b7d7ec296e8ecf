"""Sampler tests against naive per-row references (CPU, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from scheduler_svc.protocol import SamplingOptions
from worker_svc import sampler as sampler_module
from worker_svc.sampler import Sampler, SamplingTensors, apply_top_k_top_p, derive_seed

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


def _kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row > float("-inf")).flatten().tolist())


def _record_full_sorts(monkeypatch) -> list[int | None]:
    """The fallbacks of `apply_top_k_top_p` to a full sort (it calls itself with None)."""
    calls: list[int | None] = []
    original = sampler_module.apply_top_k_top_p

    def recording(logits, top_k, top_p, num_candidates=None):
        calls.append(num_candidates)
        return original(logits, top_k, top_p, num_candidates)

    monkeypatch.setattr(sampler_module, "apply_top_k_top_p", recording)
    return calls


def test_top_p_beyond_the_candidate_window_is_exact(monkeypatch) -> None:
    # Over 1024 tokens: a peaked row's nucleus fits the candidate window, a flat row's does not.
    logits = torch.cat([_logits(1, 3000, seed=12, scale=4.0), _logits(1, 3000, seed=13, scale=0.3)])
    opts = [SamplingOptions(temperature=1.0, top_p=0.9), SamplingOptions(temperature=1.0, top_p=0.8)]
    allowed = [_naive_allowed(row, o) for row, o in zip(logits, opts)]
    assert len(allowed[0]) < 1024 < len(allowed[1])
    params = SamplingTensors.build(opts, 3000, torch.device("cpu"))
    assert params.num_candidates == 1024
    full_sorts = _record_full_sorts(monkeypatch)
    peaked = apply_top_k_top_p(logits[:1], params.top_k[:1], params.top_p[:1], params.num_candidates)
    assert full_sorts == [] and _kept(peaked[0]) == allowed[0]
    both = apply_top_k_top_p(logits, params.top_k, params.top_p, params.num_candidates)
    assert full_sorts == [None]  # the flat row's nucleus spills past the window
    assert [_kept(row) for row in both] == allowed
    window = set(logits[1].topk(1024).indices.tolist())
    sampler = Sampler("cpu", seed=14)
    drawn = [sampler.sample(logits, opts, [0, 0]).tolist() for _ in range(50)]
    assert all(t0 in allowed[0] and t1 in allowed[1] for t0, t1 in drawn)
    assert any(t1 not in window for _, t1 in drawn), "the flat row never left the window"


def test_top_k_past_the_candidates_measures_top_p_over_its_whole_top_k_set(monkeypatch) -> None:
    # Worked by hand: probabilities 0.445, 0.445, 0.02, 0.02, 0.01, 0.01, 0.01, then 0.04 over
    # 57 tokens. The top-7 set holds 0.96, of which the first two tokens hold 0.89 / 0.96 = 0.927:
    # with top_p 0.9 they are the nucleus. (Over the whole row they hold 0.89 < 0.9, and a third
    # token would wrongly be kept.)
    probs = torch.tensor([0.445, 0.445, 0.02, 0.02, 0.01, 0.01, 0.01] + [0.04 / 57] * 57)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    logits = torch.empty(1, 64)
    logits[0, order] = probs.log()
    full_sorts = _record_full_sorts(monkeypatch)
    for num_candidates in (None, 4, 6, 7, 64):
        masked = apply_top_k_top_p(logits, torch.tensor([7]), torch.tensor([0.9]), num_candidates)
        assert _kept(masked[0]) == set(order[:2].tolist()), num_candidates
        assert torch.equal(masked[0, order[:2]], logits[0, order[:2]])
    assert full_sorts == [None, None]  # 4 and 6 candidates do not hold the top-7 set


def test_rows_inside_the_candidates_are_exact_without_a_full_sort(monkeypatch) -> None:
    vocab, num_candidates = 64, 8
    opts = [SamplingOptions(temperature=1.0, top_k=k, top_p=p)
            for k in (1, 3, 7, 8) for p in (1.0, 0.9, 0.5, 0.2)]
    logits = _logits(len(opts), vocab, seed=15, scale=2.0)
    # Top-p alone on peaked rows, whose 8 largest tokens hold more than 0.99 of the mass.
    opts += [SamplingOptions(temperature=1.0, top_p=p) for p in (0.99, 0.9, 0.5)]
    logits = torch.cat([logits, _logits(3, vocab, seed=16, scale=6.0)])
    opts.append(SamplingOptions(temperature=1.0))  # unrestricted: returned as it is
    logits = torch.cat([logits, _logits(1, vocab, seed=17)])
    full_sorts = _record_full_sorts(monkeypatch)
    masked = apply_top_k_top_p(
        logits,
        torch.tensor([o.top_k or vocab for o in opts]),
        torch.tensor([o.top_p for o in opts]),
        num_candidates,
    )
    assert full_sorts == []
    for row, o in enumerate(opts):
        assert _kept(masked[row]) == _naive_allowed(logits[row], o), (row, o)
        assert torch.equal(masked[row][list(_kept(masked[row]))], logits[row][list(_kept(masked[row]))])


def test_sampler_ranks_at_least_every_top_k(monkeypatch) -> None:
    def num_candidates(*opts: SamplingOptions) -> int | None:
        return SamplingTensors.build(list(opts), 5000, torch.device("cpu")).num_candidates

    assert num_candidates(GREEDY, SamplingOptions(temperature=1.0)) is None  # nothing to mask
    assert num_candidates(SamplingOptions(temperature=1.0, top_k=5)) == 5
    assert num_candidates(SamplingOptions(temperature=1.0, top_p=0.5)) == 1024
    assert num_candidates(SamplingOptions(temperature=1.0, top_k=5),
                          SamplingOptions(temperature=1.0, top_k=2000, top_p=0.9)) == 2000
    assert num_candidates(SamplingOptions(top_k=5), SamplingOptions(temperature=1.0)) is None  # greedy
    assert num_candidates(SamplingOptions(temperature=1.0, top_k=5000)) is None  # the whole vocab
    calls = _record_full_sorts(monkeypatch)
    Sampler("cpu", seed=0).sample(_logits(2, 5000), [SamplingOptions(temperature=1.0, top_k=5)] * 2, [0, 0])
    assert calls == [5]  # the sampler ranks 5 candidates, never the whole vocabulary


def test_sampling_tensors_hold_each_rows_options() -> None:
    opts = [
        GREEDY,
        SamplingOptions(temperature=0.5, top_k=7, top_p=0.25),
        SamplingOptions(temperature=2.0, top_k=100, top_p=1.5),  # top-k past the vocab; top-p clamped
        SamplingOptions(temperature=1e-6, top_k=3, top_p=-0.5),  # below 1e-5: greedy
    ]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the tensors' dtypes must not follow the default
    try:
        params = SamplingTensors.build(opts, 50, torch.device("meta"))  # nor the host's device
    finally:
        torch.set_default_dtype(previous)
    tensors = (params.temperature, params.top_k, params.top_p, params.greedy)
    assert [t.device.type for t in tensors] == ["meta"] * 4
    assert [t.dtype for t in tensors] == [torch.float32, torch.int64, torch.float32, torch.bool]
    params = SamplingTensors.build(opts, 50, torch.device("cpu"))
    assert params.temperature.tolist() == [1.0, 0.5, 2.0, 1.0]  # greedy rows never divide
    assert params.top_k.tolist() == [50, 7, 50, 3]
    assert params.top_p.tolist() == [1.0, 0.25, 1.0, 0.0]
    assert params.greedy.tolist() == [True, False, False, True] and params.any_greedy
    assert params.num_candidates == 7
    assert not SamplingTensors.build(opts[1:3], 50, torch.device("cpu")).any_greedy
    assert params.log_min_p is None  # no row uses min-p


def test_min_p_tensor_is_off_for_greedy_rows_and_clamped_to_one() -> None:
    opts = [SamplingOptions(min_p=0.5),  # greedy (temperature 0): min-p has no say
            SamplingOptions(temperature=1.0, min_p=0.25),
            SamplingOptions(temperature=1.0, min_p=1.5),  # clamped to 1: only the top token(s)
            SamplingOptions(temperature=1.0)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its dtype must not follow the default
    try:
        on_meta = SamplingTensors.build(opts, 50, torch.device("meta"))  # nor the host's device
    finally:
        torch.set_default_dtype(previous)
    assert (on_meta.log_min_p.device.type, on_meta.log_min_p.dtype) == ("meta", torch.float32)
    log_min_p = SamplingTensors.build(opts, 50, torch.device("cpu")).log_min_p
    assert log_min_p.tolist() == [float("-inf"), torch.tensor(0.25).log().item(), 0.0, float("-inf")]


def test_the_greedy_threshold_is_below_1e_5() -> None:
    # Two tied best tokens: a sampled row picks either, by its own seed; a greedy row the first.
    logits = torch.tensor([[3.0, 3.0] + [0.0] * 30] * 64)
    opts = [SamplingOptions(temperature=1e-5, seed=i) for i in range(64)]
    first = Sampler("cpu", seed=1).sample(logits, opts, [0] * 64)
    second = Sampler("cpu", seed=2).sample(logits, opts, [0] * 64)
    assert torch.equal(first, second)  # seeded rows: their own noise, not the sampler's
    assert set(first.tolist()) == {0, 1}  # sampled, not greedy
    assert set(Sampler("cpu", seed=1).sample(logits, [SamplingOptions(temperature=9e-6)] * 64,
                                             [0] * 64).tolist()) == {0}


def test_top_p_drops_a_token_whose_preceding_mass_reaches_it_exactly() -> None:
    # Uniform over 8 tokens: the first four hold exactly 0.5, so top_p 0.5 keeps those four.
    for vocab, num_candidates in ((8, None), (16, 8)):
        masked = apply_top_k_top_p(torch.zeros(1, vocab), torch.tensor([vocab]), torch.tensor([0.5]),
                                   num_candidates)
        assert len(_kept(masked[0])) == vocab // 2


def test_splitmix64_matches_its_published_output() -> None:
    # Vigna's splitmix64.c seeded with 1234567: its first five outputs. Our _splitmix64(x) is one
    # step from state x (the state is advanced by the golden gamma before mixing).
    gamma = 0x9E3779B97F4A7C15
    outputs = [sampler_module._splitmix64((1234567 + i * gamma) % 2**64) for i in range(5)]
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                       4593380528125082431, 16408922859458223821]


def _splitmix64_step(state: int) -> int:
    """splitmix64.c's next(), written out from the reference (checked by the test above)."""
    z = (state + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_derive_seed_mixes_seed_then_position_below_2_63() -> None:
    for seed, position in ((0, 0), (1234, 17), (2**64 + 5, 3), (-1, 2**40)):
        mixed = _splitmix64_step(_splitmix64_step(seed % 2**64) ^ position)
        assert derive_seed(seed, position) == mixed >> 1 < 2**63, (seed, position)


def test_a_seeded_sampler_repeats_itself_and_seeded_rows_leave_it_untouched() -> None:
    logits = _logits(16, 500, seed=18, scale=0.3)
    unseeded = [SamplingOptions(temperature=1.0)] * 16
    seeded = [SamplingOptions(temperature=1.0, seed=i) for i in range(16)]
    plain = Sampler("cpu", seed=3).sample(logits, unseeded, [0] * 16)
    sampler = Sampler("cpu", seed=3)
    sampler.sample(logits, seeded, [0] * 16)  # draws only from the rows' own generators
    assert torch.equal(sampler.sample(logits, unseeded, [0] * 16), plain)


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


def test_an_unseeded_sampler_seeds_itself_with_63_random_bits(monkeypatch) -> None:
    # torch.Generator.manual_seed rejects seeds of 2**63 and above on some builds.
    monkeypatch.setattr(sampler_module.os, "urandom", lambda n: b"\xff" * n)
    assert Sampler("cpu").generator.initial_seed() == 2**63 - 1
