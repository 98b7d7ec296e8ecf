"""Benchmark workloads: lists of token-id prompts with the number of tokens to generate.

Prompts are random token ids, so no tokenizer or dataset is needed and input lengths are exact.
Ids are drawn from [MIN_TOKEN_ID, vocab_size): low ids are special and control tokens in most
vocabularies, and the rest decode to ordinary (if meaningless) text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_TOKEN_ID = 1000

# ShareGPT statistics from the vLLM paper (Kwon et al., SOSP 2023, section 6.1, Fig. 11a):
# mean input 161.31 tokens, mean output 337.99 tokens (8.4x and 5.8x Alpaca's 19.31 and 58.45).
SHAREGPT_MEAN_INPUT = 161.31
SHAREGPT_MEAN_OUTPUT = 337.99
# The paper gives means and histograms, not a fit. These log-normal shapes are our choice: they
# put p99 about 10x (inputs) and 8x (outputs) above the median, the long tail of those histograms.
SHAREGPT_INPUT_SIGMA = 1.0
SHAREGPT_OUTPUT_SIGMA = 0.9
# vLLM's sample_sharegpt_requests drops pairs with fewer than 4 prompt or output tokens.
SHAREGPT_MIN_LEN = 4


@dataclass(slots=True)
class BenchRequest:
    """One request of a workload: the prompt's token ids and exactly how many tokens to generate,
    with the request's scheduling priority (lower runs first) and prefix-cache salt."""

    prompt_token_ids: list[int]
    max_tokens: int
    priority: int = 0
    cache_salt: str = ""


def random_workload(
    n: int, input_len_range: tuple[int, int], output_len_range: tuple[int, int], vocab_size: int, seed: int
) -> list[BenchRequest]:
    """n requests with input and output lengths uniform over the inclusive ranges."""
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(input_len_range[0], input_len_range[1], size=n, endpoint=True)
    output_lens = rng.integers(output_len_range[0], output_len_range[1], size=n, endpoint=True)
    return [BenchRequest(_random_ids(rng, int(i), vocab_size), int(o)) for i, o in zip(input_lens, output_lens)]


def sharegpt_like_workload(
    n: int, seed: int, max_input: int, max_output: int, vocab_size: int, min_len: int = SHAREGPT_MIN_LEN
) -> list[BenchRequest]:
    """n requests whose lengths follow a synthetic, ShareGPT-like long-tailed distribution.

    No dataset can be downloaded here, so lengths are log-normal with the mean input and output
    lengths ShareGPT has in the vLLM paper (161.31 and 337.99 tokens; see the constants above),
    sigma 1.0 (inputs) and 0.9 (outputs), mu = ln(mean) - sigma^2 / 2 so the unclipped mean matches.
    Lengths are rounded and clipped to [min_len, max_input] and [min_len, max_output]; clipping
    trims the far tail, so pass max_input + max_output <= the model's context length (vLLM's own
    ShareGPT filter keeps prompts <= 1024 and prompt + output <= 2048 tokens).
    """
    rng = np.random.default_rng(seed)
    input_lens = _lognormal_lengths(rng, n, SHAREGPT_MEAN_INPUT, SHAREGPT_INPUT_SIGMA, min_len, max_input)
    output_lens = _lognormal_lengths(rng, n, SHAREGPT_MEAN_OUTPUT, SHAREGPT_OUTPUT_SIGMA, min_len, max_output)
    return [BenchRequest(_random_ids(rng, int(i), vocab_size), int(o)) for i, o in zip(input_lens, output_lens)]


def shared_prefix_workload(
    n: int,
    prefix_len: int,
    suffix_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
    vocab_size: int,
) -> list[BenchRequest]:
    """n requests that all start with the same prefix_len tokens (a system prompt, few-shot
    examples), followed by a distinct random suffix: the workload a prefix cache speeds up."""
    rng = np.random.default_rng(seed)
    prefix = _random_ids(rng, prefix_len, vocab_size)
    suffix_lens = rng.integers(suffix_len_range[0], suffix_len_range[1], size=n, endpoint=True)
    output_lens = rng.integers(output_len_range[0], output_len_range[1], size=n, endpoint=True)
    return [BenchRequest(prefix + _random_ids(rng, int(s), vocab_size), int(o)) for s, o in zip(suffix_lens, output_lens)]


def save_workload(path: str | Path, requests: list[BenchRequest]) -> None:
    """Write `[{"prompt_token_ids": [...], "max_tokens": N}, ...]` (the baseline scripts read it);
    `priority` and `cache_salt` appear only where they differ from their defaults."""
    Path(path).write_text(json.dumps([_to_json(request) for request in requests]))


def load_workload(path: str | Path) -> list[BenchRequest]:
    """Read a workload written by `save_workload`."""
    return [
        BenchRequest(list(item["prompt_token_ids"]), int(item["max_tokens"]),
                     int(item.get("priority", 0)), str(item.get("cache_salt", "")))
        for item in json.loads(Path(path).read_text())
    ]


def _to_json(request: BenchRequest) -> dict:
    # Defaults are left out, so a plain workload's file stays in the format other tools read.
    item = {"prompt_token_ids": request.prompt_token_ids, "max_tokens": request.max_tokens}
    if request.priority:
        item["priority"] = request.priority
    if request.cache_salt:
        item["cache_salt"] = request.cache_salt
    return item


def _random_ids(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {MIN_TOKEN_ID}, got {vocab_size}")
    return rng.integers(MIN_TOKEN_ID, vocab_size, size=length).tolist()


def _lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, low: int, high: int) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=n)), low, high).astype(int)
