"""Per-row changes to the raw logits before sampling: logit bias, min_tokens, penalties.

The order is vLLM's: the bias is added to the raw logits, min_tokens masks its stop ids, then
the penalties, with the formulas vLLM and OpenAI use:

- repetition (Hugging Face's rule) over every token of the prompt and the output: a positive
  logit is divided by the penalty, a negative one multiplied by it;
- frequency and presence over the output only: `logit -= frequency * count + presence * (count > 0)`.

Each is a few tensor ops over the whole batch, touching only the (row, token) entries a row's
bias, stop ids or history name. Python touches each row only to gather those token ids; nothing
loops over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch

from scheduler_svc.protocol import SamplingOptions


@dataclass(slots=True, frozen=True)
class RowHistory:
    """The tokens a row's request has so far: the prompt, then what it generated."""

    token_ids: Sequence[int]
    num_prompt_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def output_token_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens:]


def _has_penalties(o: SamplingOptions) -> bool:
    return o.presence_penalty != 0.0 or o.frequency_penalty != 0.0 or o.repetition_penalty != 1.0


def _masks_stop_ids(o: SamplingOptions, history: RowHistory) -> bool:
    return bool(o.min_tokens_stop_ids) and history.num_output_tokens < o.min_tokens


def needs_history(options: Sequence[SamplingOptions]) -> bool:
    """Whether any row's adjustment reads its token history."""
    return any(_has_penalties(o) or o.min_tokens for o in options)


def needs_adjustment(options: Sequence[SamplingOptions]) -> bool:
    return any(_has_penalties(o) or o.logit_bias or o.min_tokens for o in options)


def adjust_logits(
    logits: torch.Tensor, options: Sequence[SamplingOptions], histories: Sequence[RowHistory] | None
) -> torch.Tensor:
    """Return float32 logits [N, V] with every row's bias, min_tokens mask and penalties applied
    (a new tensor: the caller's raw logits stay as they were, for log-probabilities)."""
    if not needs_adjustment(options):
        return logits
    if histories is None and needs_history(options):
        raise ValueError("penalties and min_tokens need each row's token history")
    logits = logits.to(torch.float32, copy=True)
    _add_logit_bias(logits, options)
    if histories is not None:
        _mask_stop_ids(logits, options, histories)
        _apply_penalties(logits, options, histories)
    return logits


def _scatter_index(rows: Sequence[int], per_row: Sequence[Sequence[int]], device: torch.device):
    """(row index, column index) int64 tensors for the entries `per_row[i]` of row `rows[i]`."""
    lengths = np.fromiter((len(cols) for cols in per_row), dtype=np.int64, count=len(per_row))
    row_index = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    col_index = np.fromiter(chain.from_iterable(per_row), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(row_index).to(device), torch.from_numpy(col_index).to(device)


def _add_logit_bias(logits: torch.Tensor, options: Sequence[SamplingOptions]) -> None:
    rows = [i for i, o in enumerate(options) if o.logit_bias]
    if not rows:
        return
    row_index, col_index = _scatter_index(rows, [[t for t, _ in options[i].logit_bias] for i in rows],
                                          logits.device)
    bias = [b for i in rows for _, b in options[i].logit_bias]
    logits.index_put_((row_index, col_index), torch.tensor(bias, dtype=logits.dtype, device=logits.device),
                      accumulate=True)


def _mask_stop_ids(logits: torch.Tensor, options: Sequence[SamplingOptions],
                   histories: Sequence[RowHistory]) -> None:
    rows = [i for i, (o, h) in enumerate(zip(options, histories)) if _masks_stop_ids(o, h)]
    if not rows:
        return
    row_index, col_index = _scatter_index(rows, [options[i].min_tokens_stop_ids for i in rows], logits.device)
    logits[row_index, col_index] = float("-inf")


def _apply_penalties(logits: torch.Tensor, options: Sequence[SamplingOptions],
                     histories: Sequence[RowHistory]) -> None:
    """Repetition, then frequency and presence, on `logits` in place. Sparse: only the (row,
    token) entries a history holds are read and written, so the cost follows the histories'
    lengths, not batch x vocabulary."""
    flat = logits.view(-1)  # adjust_logits' own contiguous copy
    vocab = logits.shape[1]
    repeating = [i for i, o in enumerate(options) if o.repetition_penalty != 1.0]
    if repeating:
        seen, _ = _unique_entries(repeating, [histories[i].token_ids for i in repeating], vocab, flat.device)
        penalty = _per_entry([o.repetition_penalty for o in options], seen, vocab, flat)
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    counting = [i for i, o in enumerate(options) if o.presence_penalty != 0.0 or o.frequency_penalty != 0.0]
    if counting:
        entries, counts = _unique_entries(counting, [histories[i].output_token_ids() for i in counting], vocab,
                                          flat.device)
        frequency = _per_entry([o.frequency_penalty for o in options], entries, vocab, flat)
        presence = _per_entry([o.presence_penalty for o in options], entries, vocab, flat)
        flat.index_add_(0, entries, -(frequency * counts.to(flat.dtype) + presence))


def _unique_entries(rows: Sequence[int], token_ids: Sequence[Sequence[int]], vocab: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct flat indices `row * vocab + token` of `token_ids[i]` in row `rows[i]`, and
    how often each occurs."""
    row_index, col_index = _scatter_index(rows, token_ids, device)
    return torch.unique(row_index * vocab + col_index, return_counts=True)


def _per_entry(per_row: list[float], entries: torch.Tensor, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """A per-row value spread over flat `entries`."""
    return torch.tensor(per_row, dtype=like.dtype, device=like.device)[entries // vocab]
