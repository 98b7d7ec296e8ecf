"""Per-step attention inputs shared by every layer (semantics: docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each sequence attends to.

    Sequence `s` owns query rows `cu_seqlens_q[s]:cu_seqlens_q[s+1]`; those are its last `q_len`
    positions of `seq_lens[s]`. The `*_cpu` lists mirror the device tensors so host code (the CPU
    kernels, launch sizing) never reads a device tensor back.
    """

    slot_mapping: torch.Tensor  # int64 [T]; -1 skips the cache write
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S], context length after this step's tokens
    cu_seqlens_q: torch.Tensor  # int32 [S + 1]
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        seq_lens: list[int],
        query_lens: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences whose last `query_lens[s]` of `seq_lens[s]` tokens run now."""
        if not (len(block_tables) == len(seq_lens) == len(query_lens)) or not seq_lens:
            raise ValueError("block_tables, seq_lens and query_lens need one entry per sequence")
        slots: list[int] = []
        for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens, strict=True):
            if not 0 < q_len <= seq_len or len(table) * block_size < seq_len:
                raise ValueError(
                    f"bad sequence: q_len={q_len} seq_len={seq_len} blocks={len(table)}"
                )
            slots.extend(
                table[i // block_size] * block_size + i % block_size
                for i in token_range(seq_len, q_len)
            )
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cu = [0]
        for q_len in query_lens:
            cu.append(cu[-1] + q_len)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device),
            block_tables=torch.tensor(padded, dtype=torch.int32).to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32).to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


def token_range(seq_len: int, query_len: int) -> range:
    """Positions of the tokens computed this step: the sequence's last `query_len`."""
    return range(seq_len - query_len, seq_len)


def positions_for(
    seq_lens: list[int], query_lens: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int64 `[T]` positions of the flattened batch, matching `AttentionMetadata.build`'s order."""
    positions = [p for s, q in zip(seq_lens, query_lens, strict=True) for p in token_range(s, q)]
    return torch.tensor(positions, dtype=torch.int64).to(device)
