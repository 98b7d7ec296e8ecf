"""Batched next-token sampling with per-row options.

Every row carries its own temperature, top-k, top-p and optional seed. Sampling uses the
exponential race: `argmax(probs / q)` with `q ~ Exp(1)` draws from `probs` exactly, and lets the
noise of a seeded row come from its own generator while the rest of the batch shares one tensor op.

A seeded row's noise is drawn from a generator seeded from (seed, position of the token being
sampled), so the token depends on neither batch composition nor preemption.

Order of the steps (vLLM's): logit bias, min_tokens and penalties on the raw logits
(logits_processing.py), then greedy argmax or temperature, top-k, top-p and min-p. A constrained
row's structured-output mask is applied before all of them, by the model runner (token_mask.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from scheduler_svc.protocol import SamplingOptions
from worker_svc.logits_processing import RowHistory, adjust_logits

_MASK64 = (1 << 64) - 1
# Temperatures below this are treated as greedy: dividing by them would overflow float32.
_MIN_TEMPERATURE = 1e-5
# Candidates ranked for a top-p-only row before falling back to a full sort: an LLM's nucleus
# is almost always far smaller.
_TOP_P_CANDIDATES = 1024


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, position: int) -> int:
    """Generator seed for the token at `position` of a request seeded with `seed`.

    Mixed twice so that neighbouring (seed, position) pairs give unrelated streams; kept below
    2**63 because `torch.Generator.manual_seed` rejects larger values on some builds.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 1


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling options as device tensors, built once per step."""

    temperature: torch.Tensor  # float32 [N], 1.0 on greedy rows (they never use it)
    top_k: torch.Tensor  # int64 [N], vocab size where unlimited
    top_p: torch.Tensor  # float32 [N]
    log_min_p: torch.Tensor | None  # float32 [N], -inf where off; None: no row uses min-p
    greedy: torch.Tensor  # bool [N]
    any_greedy: bool
    num_candidates: int | None  # tokens the top-k/top-p masks look at; None: no mask needed

    @classmethod
    def build(
        cls, options: list[SamplingOptions], vocab_size: int, device: torch.device
    ) -> SamplingTensors:
        greedy = [o.temperature < _MIN_TEMPERATURE for o in options]
        temperature = [1.0 if g else o.temperature for g, o in zip(greedy, options)]
        top_k = [o.top_k if 0 < o.top_k < vocab_size else vocab_size for o in options]
        top_p = [min(max(o.top_p, 0.0), 1.0) for o in options]
        # Each restricted row needs its top-k, or for top-p alone a first guess at the nucleus.
        needs = [
            k if k < vocab_size else _TOP_P_CANDIDATES
            for g, k, p in zip(greedy, top_k, top_p)
            if not g and (k < vocab_size or p < 1.0)
        ]
        min_p = [0.0 if g else min(max(o.min_p, 0.0), 1.0) for g, o in zip(greedy, options)]
        log_min_p = None
        if any(min_p):
            log_min_p = torch.tensor(min_p, dtype=torch.float32, device=device).log()
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            log_min_p=log_min_p,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            any_greedy=any(greedy),
            num_candidates=max(needs) if needs else None,
        )


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    `top_k` int64 [N] (vocab size: no limit), `top_p` float32 [N] (1.0: no limit). Top-p is
    measured on the distribution already restricted to the top-k tokens; the most likely token
    always survives. Only the `num_candidates` largest logits per row are ranked (a full sort
    costs ~20x a top-k of 1024 on CPU). A batch with a row whose allowed set may reach past
    them (a top-k larger than `num_candidates`, or no top-k and a nucleus the candidates do not
    cover) is redone with a full sort, so the result is exact either way; `Sampler` passes at
    least every row's top-k, so only the nucleus can spill.
    """
    vocab = logits.shape[-1]
    k = vocab if num_candidates is None else min(num_candidates, vocab)
    if k < vocab and bool(((top_k > k) & (top_k < vocab)).any()):
        # Top-p of such a row is measured against its whole top-k set, past the candidates.
        return apply_top_k_top_p(logits, top_k, top_p, None)
    if k < vocab:
        values, indices = logits.topk(k, dim=-1)
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    rank = torch.arange(k, device=logits.device)
    values = values.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
    lse = values.logsumexp(-1, keepdim=True)
    # A row without top-k (top_k == vocab, beyond the candidates) normalises over the whole row.
    beyond = top_k > k
    if k < vocab and bool(beyond.any()):
        lse = torch.where(beyond.unsqueeze(1), logits.logsumexp(-1, keepdim=True), lse)
    probs = (values - lse).exp()
    mass = probs.cumsum(dim=-1)
    # A token is kept while the mass strictly before it is below top_p.
    outside = (mass - probs) >= top_p.unsqueeze(1)
    outside[:, 0] = False
    values = values.masked_fill(outside, float("-inf"))

    restricted = (top_k < vocab) | (top_p < 1.0)
    if k < vocab:
        # The next token past the candidates would still be allowed: rank the whole row.
        spills = restricted & (top_k > k) & (mass[:, -1] < top_p)
        if bool(spills.any()):
            return apply_top_k_top_p(logits, top_k, top_p, None)
    masked = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    return torch.where(restricted.unsqueeze(1), masked, logits)


def apply_min_p(logits: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits whose probability is below min_p times the row's top probability.

    `log_min_p` float32 [N] (-inf: off). In logit space the test is `logit < max + log(min_p)`;
    the ratio to the top probability is the same before and after top-k/top-p renormalise, so
    the order of the three masks does not matter.
    """
    threshold = logits.max(dim=-1, keepdim=True).values + log_min_p.unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Sampler:
    """Samples one token per logits row. Owns the generator for unseeded rows.

    `argmax` computes `logits.argmax(dim=-1)` of `[N, vocab]` rows, the greedy pick and the
    exponential race's winner: a faster kernel with the same results plugs in (on a float32 CPU
    model, `worker_svc.cpu_fused_ops.CpuElementwise.argmax`).
    """

    def __init__(self, device: torch.device | str, seed: int | None = None,
                 argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax) -> None:
        self.device = torch.device(device)
        self.argmax = argmax
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        options: list[SamplingOptions],
        positions: list[int],
        histories: list[RowHistory] | None = None,
    ) -> torch.Tensor:
        """Return int64 [N] token ids for float32 logits [N, vocab] (left unchanged).

        `positions[i]` is the index the sampled token will have in row i's sequence; it only
        matters for seeded rows. `histories` (each row's prompt and output tokens) are needed
        when a row has penalties or min_tokens.
        """
        if logits.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        logits = adjust_logits(logits, options, histories)
        if all(o.temperature < _MIN_TEMPERATURE for o in options):
            return self.argmax(logits)  # the common path builds no option tensors at all
        params = SamplingTensors.build(options, logits.shape[-1], logits.device)
        sampled = self._sample_random(logits, params, options, positions)
        if params.any_greedy:
            sampled = torch.where(params.greedy, self.argmax(logits), sampled)
        return sampled

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: SamplingTensors,
        options: list[SamplingOptions],
        positions: list[int],
    ) -> torch.Tensor:
        logits = logits / params.temperature.unsqueeze(1)
        if params.num_candidates is not None:
            logits = apply_top_k_top_p(logits, params.top_k, params.top_p,
                                       params.num_candidates)
        if params.log_min_p is not None:
            logits = apply_min_p(logits, params.log_min_p)
        probs = logits.softmax(dim=-1)
        noise = self._exponential_noise(probs, options, positions)
        return self.argmax(probs.div_(noise))

    def _exponential_noise(
        self, probs: torch.Tensor, options: list[SamplingOptions], positions: list[int]
    ) -> torch.Tensor:
        """Exp(1) noise as -log(U): several times faster than `exponential_` on CPU.

        U = 0 gives q = inf, so that token scores 0 (never NaN: probs are finite).
        """
        noise = torch.empty_like(probs)
        seeded = [
            i
            for i, o in enumerate(options)
            if o.seed is not None and o.temperature >= _MIN_TEMPERATURE
        ]
        if len(seeded) < len(options):
            noise.uniform_(generator=self.generator)
        # Per-row generators only where a seed demands reproducibility.
        row_generator = torch.Generator(device=probs.device)
        for i in seeded:
            row_generator.manual_seed(derive_seed(options[i].seed, positions[i]))
            noise[i].uniform_(generator=row_generator)
        return noise.log_().neg_()
