"""Structured output on the worker: a plan's token masks applied to the logits before sampling.

The scheduler computes each constrained row's allowed tokens (scheduler_svc/structured_output.py)
and sends them packed one bit per token (`protocol.TokenMask`). Here they are unpacked for all
rows at once and every forbidden logit becomes -inf, so sampling, greedy or not, can only pick an
allowed token. The -inf is added, not written: a bias of 0 or -max (from the bits, with no
branch) added twice overflows to exactly -inf and leaves allowed logits bit for bit as they were.
On a CPU that is about 10x faster than `masked_fill` or `torch.where` over a bool mask as
irregular as a vocabulary's (docs/benchmarks.md, structured outputs).
"""

from __future__ import annotations

import numpy as np
import torch

from scheduler_svc.protocol import TokenMask

_BIT_WEIGHTS = [1 << bit for bit in range(8)]  # bit b of byte k is token 8 * k + b


def apply_token_masks(logits: torch.Tensor, req_ids: list[str], token_masks: list[TokenMask]) -> torch.Tensor:
    """Set the forbidden tokens of the masked rows of float `logits` [N, vocab] to -inf, in place.

    `req_ids[i]` names row i; rows without a mask are left as they are. Tokens past a mask's last
    bit are forbidden. Returns `logits`.
    """
    if not token_masks:
        return logits
    row_of = {req_id: row for row, req_id in enumerate(req_ids)}
    missing = [m.req_id for m in token_masks if m.req_id not in row_of]
    if missing:
        raise ValueError(f"token masks for requests that sample nothing in this step: {missing[:4]}")
    rows = torch.tensor([row_of[m.req_id] for m in token_masks], dtype=torch.int64, device=logits.device)
    allowed = unpack_allowed(token_masks, logits.shape[-1], logits.device)
    # 0 where allowed, -max where not; added twice, -max overflows to -inf.
    bias = allowed.to(logits.dtype).sub_(1).mul_(torch.finfo(logits.dtype).max)
    return logits.index_add_(0, rows, bias, alpha=2)


def unpack_allowed(token_masks: list[TokenMask], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [len(token_masks), vocab_size] on `device`, 1 where a mask allows the token."""
    device = torch.device(device)
    num_bytes = max(len(m.allowed) for m in token_masks)
    packed = np.zeros((len(token_masks), num_bytes), dtype=np.uint8)
    for row, mask in enumerate(token_masks):
        packed[row, : len(mask.allowed)] = np.frombuffer(mask.allowed, dtype=np.uint8)
    if device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little"))
    else:  # the packed bytes cross (an eighth of the bits) and are unpacked there
        bits = unpack_bits(torch.from_numpy(packed).to(device, non_blocking=True))
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=0)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [M, 8 * bytes] from uint8 [M, bytes], little-endian bits, on `packed`'s device
    (numpy's `unpackbits` on the host is faster; this is for an accelerator)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return packed.unsqueeze(-1).bitwise_and(weights).ne(0).to(torch.uint8).reshape(packed.shape[0], -1)
