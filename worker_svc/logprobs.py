"""Log-probabilities of sampled tokens, chosen on the worker so only a few floats leave it.

Computed as vLLM reports them by default: fp32 `log_softmax` of the model's raw logits, before
penalties, bias and temperature.
"""

from __future__ import annotations

from typing import Sequence

import torch

from scheduler_svc.protocol import SamplingOptions, TokenLogprobs


def gather_logprobs(
    raw_logits: torch.Tensor, options: Sequence[SamplingOptions], sampled: torch.Tensor
) -> list[TokenLogprobs | None]:
    """Per row of `raw_logits` [N, V]: the logprob of `sampled[i]` and of the row's
    `options[i].logprobs` most likely tokens, or None where the row asked for none.
    Returns [] when no row asked (the result then carries nothing)."""
    rows = [i for i, o in enumerate(options) if o.logprobs is not None]
    if not rows:
        return []
    index = torch.tensor(rows, dtype=torch.int64, device=raw_logits.device)
    # One fused pass (torch's CPU log_softmax beats logsumexp plus gathers by 3x).
    logprobs = raw_logits.index_select(0, index).to(torch.float32).log_softmax(dim=-1)
    sampled_logprobs = logprobs.gather(1, sampled.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    num_top = max(options[i].logprobs for i in rows)
    if num_top:
        top_values, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    result: list[TokenLogprobs | None] = [None] * len(options)
    for j, i in enumerate(rows):
        n = options[i].logprobs
        result[i] = TokenLogprobs(
            sampled=sampled_logprobs[j],
            top_token_ids=top_ids[j][:n] if n else [],
            top_logprobs=top_values[j][:n] if n else [],
        )
    return result
