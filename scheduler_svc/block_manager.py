"""Paged KV cache bookkeeping: fixed-size blocks, a free queue and one block table per request.

Order is deterministic so tests can assert exact block ids:
- a fresh pool hands out the lowest ids first;
- allocation takes blocks from the front of the free queue, freeing appends to its back;
- a request's blocks are freed tail-first (last block first), so once prefix caching keeps freed
  blocks reusable, a prompt's tail is evicted before its head, which later prompts share more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler_svc.request import Request


@dataclass(slots=True)
class Block:
    """Metadata of one KV block; `ref_cnt` counts the requests whose block table holds it."""

    block_id: int
    ref_cnt: int = 0


class BlockManager:
    """Owns the pool of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.block_size = block_size
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # An ordered dict gives O(1) pop from the front and O(1) removal from the middle (the
        # latter for prefix-cache hits on a freed block).
        self._free_blocks: OrderedDict[int, Block] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self._block_tables: dict[str, list[Block]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def free_block_ids(self) -> list[int]:
        """Free block ids in the order they will be handed out."""
        return list(self._free_blocks)

    def num_required_blocks(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_new_blocks: int, watermark_blocks: int = 0) -> bool:
        """Whether `num_new_blocks` fit while leaving `watermark_blocks` free."""
        return self.num_free_blocks - num_new_blocks >= watermark_blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, watermark_blocks: int = 0
    ) -> list[int] | None:
        """Grow `request`'s block table to hold `num_computed_tokens + num_new_tokens` tokens.

        Returns the ids of the blocks added (possibly none), or None when they do not fit with
        `watermark_blocks` left free; a failed call allocates nothing.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        block_table = self._block_tables.get(request.req_id, [])
        num_tokens = request.num_computed_tokens + num_new_tokens
        num_new_blocks = self.num_required_blocks(num_tokens) - len(block_table)
        if num_new_blocks <= 0:
            return []
        if not self.can_allocate(num_new_blocks, watermark_blocks):
            return None
        new_blocks = [self._pop_free_block() for _ in range(num_new_blocks)]
        self._block_tables.setdefault(request.req_id, []).extend(new_blocks)
        return [block.block_id for block in new_blocks]

    def free(self, request: Request) -> None:
        """Release every block of `request`, tail-first. Freeing twice is an error."""
        block_table = self._block_tables.pop(request.req_id, None)
        if block_table is None:
            raise RuntimeError(f"double free: request {request.req_id!r} holds no blocks")
        for block in reversed(block_table):
            self._release(block)

    def get_block_ids(self, req_id: str) -> list[int]:
        """The request's block table as a new list ([] if it holds no blocks)."""
        return [block.block_id for block in self._block_tables.get(req_id, ())]

    def _pop_free_block(self) -> Block:
        _, block = self._free_blocks.popitem(last=False)
        if block.ref_cnt != 0:
            raise RuntimeError(f"free block {block.block_id} has ref_cnt {block.ref_cnt}")
        block.ref_cnt = 1
        return block

    def _release(self, block: Block) -> None:
        if block.ref_cnt <= 0:
            raise RuntimeError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self._free_blocks[block.block_id] = block
