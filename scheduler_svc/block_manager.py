"""Paged KV cache bookkeeping: fixed-size blocks, a free queue, block tables and the prefix cache.

Order is deterministic so tests can assert exact block ids:
- a fresh pool hands out the lowest ids first;
- allocation takes blocks from the front of the free queue, freeing appends to its back;
- a request's blocks are freed tail-first (last block first), so a prompt's tail is evicted
  before its head, which later prompts share more.

Automatic prefix caching: once a block is full, it is registered under its chained hash (see
block_hash.py). Freed blocks keep their hash while they wait in the free queue, so a later request
with the same salted prefix takes them back (a hit, removed from the middle of the queue) instead
of computing them again; a block is evicted only when allocation reaches it at the queue's front
(least recently freed first). Shared blocks are counted by `ref_cnt`.

Only full blocks are ever shared, and a hit never covers a request's last token (it must be
computed to sample the next one), so a step writes only into blocks its request owns alone: a
shared block is never written and needs no copy-on-write. `allocate_slots` checks that invariant.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler_svc.block_hash import BlockHash, extend_block_hashes
from scheduler_svc.request import Request


@dataclass(slots=True)
class Block:
    """Metadata of one KV block; `ref_cnt` counts the requests whose block table holds it."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None  # set while the block is in the prefix cache


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative prefix-cache lookups, in tokens."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0
    num_evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class BlockManager:
    """Owns the pool of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # An ordered dict gives O(1) pop from the front and O(1) removal from the middle (the
        # latter for prefix-cache hits on a freed block).
        self._free_blocks: OrderedDict[int, Block] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self._block_tables: dict[str, list[Block]] = {}
        self._cached_blocks: dict[BlockHash, Block] = {}
        # How many leading blocks of each request's table are registered in the cache (or were
        # found there): the next full block to register is at this index.
        self._num_registered: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they can be evicted at will)."""
        return len(self._free_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached_blocks)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def free_block_ids(self) -> list[int]:
        """Free block ids in the order they will be handed out (evicted)."""
        return list(self._free_blocks)

    def num_required_blocks(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_new_blocks: int, watermark_blocks: int = 0) -> bool:
        """Whether `num_new_blocks` fit while leaving `watermark_blocks` free."""
        return self.num_free_blocks - num_new_blocks >= watermark_blocks

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """The longest run of cached blocks matching the start of `request`, for a request that
        holds no blocks. At least its last token is left to compute, so a step samples."""
        if not self.enable_prefix_caching or request.req_id in self._block_tables:
            return []
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        self._hash_full_blocks(request, max_hit_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self._cached_blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's lookup in the hit-rate statistics (none while caching is off)."""
        if not self.enable_prefix_caching:
            return
        self.stats.num_queried_tokens += num_queried_tokens
        self.stats.num_hit_tokens += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        watermark_blocks: int = 0,
        computed_blocks: list[Block] | None = None,
    ) -> list[int] | None:
        """Grow `request`'s block table to hold its computed tokens, the prefix-cache hits
        `computed_blocks` (from `get_computed_blocks`, only for a request holding no blocks) and
        `num_new_tokens` more.

        Returns the ids of the blocks added after the hits (possibly none), or None when they do
        not fit with `watermark_blocks` left free; a failed call changes nothing.
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        computed_blocks = computed_blocks or []
        block_table = self._block_tables.get(request.req_id, [])
        if computed_blocks and block_table:
            raise RuntimeError(f"request {request.req_id!r} already holds blocks; no hits apply")
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_tokens = num_computed + num_new_tokens
        num_new_blocks = self.num_required_blocks(num_tokens) - len(block_table) - len(computed_blocks)
        # A hit on a free block takes it out of the free queue, like an allocation.
        num_revived = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if not self.can_allocate(max(num_new_blocks, 0) + num_revived, watermark_blocks):
            return None
        block_table = self._block_tables.setdefault(request.req_id, block_table)
        for block in computed_blocks:
            self._take(block)
        block_table.extend(computed_blocks)
        if computed_blocks:
            self._num_registered[request.req_id] = len(computed_blocks)
        self._check_writable(request, block_table, num_computed)
        new_blocks = [self._pop_free_block() for _ in range(max(num_new_blocks, 0))]
        block_table.extend(new_blocks)
        self._register_full_blocks(request, block_table, num_tokens)
        return [block.block_id for block in new_blocks]

    def free(self, request: Request) -> None:
        """Release every block of `request`, tail-first. Freeing twice is an error."""
        block_table = self._block_tables.pop(request.req_id, None)
        if block_table is None:
            raise RuntimeError(f"double free: request {request.req_id!r} holds no blocks")
        self._num_registered.pop(request.req_id, None)
        for block in reversed(block_table):
            self._release(block)

    def get_block_ids(self, req_id: str) -> list[int]:
        """The request's block table as a new list ([] if it holds no blocks)."""
        return [block.block_id for block in self._block_tables.get(req_id, ())]

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds; returns how many were forgotten."""
        forgotten = [b for b in self._cached_blocks.values() if b.ref_cnt == 0]
        for block in forgotten:
            self._uncache(block)
        return len(forgotten)

    def _hash_full_blocks(self, request: Request, num_blocks: int) -> None:
        if len(request.block_hashes) < num_blocks:
            extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                                request.cache_salt, num_blocks)

    def _register_full_blocks(self, request: Request, block_table: list[Block], num_tokens: int) -> None:
        """Put the blocks that `num_tokens` tokens fill completely into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_registered.get(request.req_id, 0)
        if num_full <= start:
            return
        self._hash_full_blocks(request, num_full)
        for index in range(start, num_full):
            block, block_hash = block_table[index], request.block_hashes[index]
            # Another block may already hold these tokens (computed in the same step before
            # either was cached); keep that one, this one is freed as a plain block later.
            if block.block_hash is None and block_hash not in self._cached_blocks:
                block.block_hash = block_hash
                self._cached_blocks[block_hash] = block
        self._num_registered[request.req_id] = num_full

    def _check_writable(self, request: Request, block_table: list[Block], num_computed: int) -> None:
        """The block the step writes first must be the request's alone (see the docstring)."""
        index = num_computed // self.block_size
        if index < len(block_table) and block_table[index].ref_cnt > 1:
            raise RuntimeError(
                f"request {request.req_id!r} would write into block {block_table[index].block_id}, "
                f"shared by {block_table[index].ref_cnt} requests"
            )

    def _take(self, block: Block) -> None:
        if block.ref_cnt == 0:
            del self._free_blocks[block.block_id]
        block.ref_cnt += 1

    def _pop_free_block(self) -> Block:
        _, block = self._free_blocks.popitem(last=False)
        if block.ref_cnt != 0:
            raise RuntimeError(f"free block {block.block_id} has ref_cnt {block.ref_cnt}")
        if block.block_hash is not None:
            self._uncache(block)
            self.stats.num_evicted_blocks += 1
        block.ref_cnt = 1
        return block

    def _uncache(self, block: Block) -> None:
        del self._cached_blocks[block.block_hash]
        block.block_hash = None

    def _release(self, block: Block) -> None:
        if block.ref_cnt <= 0:
            raise RuntimeError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self._free_blocks[block.block_id] = block
