"""BlockManager on tiny pools: exact block ids, ref counts, free order, and a random fuzz."""

from __future__ import annotations

import random

import pytest

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.request import Request, SamplingParams

BLOCK_SIZE = 4


def make_request(req_id: str, num_computed_tokens: int = 0) -> Request:
    request = Request(req_id, [1] * 8, SamplingParams(max_tokens=8))
    request.num_computed_tokens = num_computed_tokens
    return request


def test_fresh_pool_hands_out_lowest_ids_first():
    bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    a, b = make_request("a"), make_request("b")
    assert bm.allocate_slots(a, 5) == [0, 1]
    assert bm.allocate_slots(b, 4) == [2]
    assert bm.allocate_slots(b, 1) == []  # b already holds a block for its first token
    assert bm.get_block_ids("a") == [0, 1]
    assert bm.num_free_blocks == 7
    assert bm.free_block_ids == [3, 4, 5, 6, 7, 8, 9]


def test_allocate_counts_from_num_computed_tokens():
    bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    a = make_request("a")
    assert bm.allocate_slots(a, 3) == [0]  # tokens 0..2
    a.num_computed_tokens = 3
    assert bm.allocate_slots(a, 1) == []  # token 3 still fits block 0
    a.num_computed_tokens = 4
    assert bm.allocate_slots(a, 1) == [1]  # token 4 opens block 1
    a.num_computed_tokens = 5
    assert bm.allocate_slots(a, 8) == [2, 3]  # tokens 5..12 end in block 3
    assert bm.get_block_ids("a") == [0, 1, 2, 3]


def test_ref_cnt_tracks_holders():
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    bm.allocate_slots(make_request("a"), 8)
    assert [block.ref_cnt for block in bm.blocks] == [1, 1, 0, 0, 0, 0]
    bm.free(make_request("a"))
    assert [block.ref_cnt for block in bm.blocks] == [0] * 6


def test_free_returns_blocks_tail_first_to_the_back_of_the_queue():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_request("a"), make_request("b")
    bm.allocate_slots(a, 12)  # [0, 1, 2]
    bm.allocate_slots(b, 4)  # [3]
    bm.free(a)
    assert bm.free_block_ids == [4, 5, 6, 7, 2, 1, 0]
    assert bm.get_block_ids("a") == []
    c = make_request("c")
    assert bm.allocate_slots(c, 24) == [4, 5, 6, 7, 2, 1]  # freed blocks come after fresh ones
    bm.free(b)
    assert bm.free_block_ids == [0, 3]


def test_failed_allocation_allocates_nothing():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a, b = make_request("a"), make_request("b")
    assert bm.allocate_slots(a, 8) == [0, 1]
    assert bm.allocate_slots(b, 9) is None  # needs 3, 2 free
    assert bm.num_free_blocks == 2
    assert bm.free_block_ids == [2, 3]
    assert bm.get_block_ids("b") == []
    assert [block.ref_cnt for block in bm.blocks] == [1, 1, 0, 0]
    a.num_computed_tokens = 8
    assert bm.allocate_slots(a, 12) is None  # growth that does not fit changes nothing either
    assert bm.get_block_ids("a") == [0, 1]
    assert bm.allocate_slots(b, 8) == [2, 3]  # exactly the rest of the pool


def test_watermark_keeps_blocks_free():
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    assert bm.can_allocate(4, watermark_blocks=2)
    assert not bm.can_allocate(5, watermark_blocks=2)
    assert bm.allocate_slots(make_request("a"), 20, watermark_blocks=2) is None  # 5 blocks
    assert bm.allocate_slots(make_request("a"), 16, watermark_blocks=2) == [0, 1, 2, 3]
    assert bm.num_free_blocks == 2


def test_double_free_raises():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a")
    bm.allocate_slots(a, 4)
    bm.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(make_request("never-allocated"))
    assert bm.num_free_blocks == 4


def test_ref_cnt_below_zero_raises():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a")
    bm.allocate_slots(a, 4)
    bm.blocks[0].ref_cnt = 0  # simulate a bookkeeping bug elsewhere
    with pytest.raises(RuntimeError, match="block 0 freed with ref_cnt 0"):
        bm.free(a)


def test_a_free_block_still_referenced_is_never_handed_out():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    bm.blocks[0].ref_cnt = 1  # simulate a bookkeeping bug elsewhere
    with pytest.raises(RuntimeError, match="free block 0 has ref_cnt 1"):
        bm.allocate_slots(make_request("a"), 4)


def test_a_step_that_would_write_into_a_shared_block_is_refused():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(12))
    a = Request("a", prompt, SamplingParams(max_tokens=8))
    assert bm.allocate_slots(a, 12) == [0, 1, 2]  # three full blocks, now in the prefix cache
    a.num_computed_tokens = 12
    b = Request("b", prompt + [99], SamplingParams(max_tokens=8))
    hits = bm.get_computed_blocks(b)
    assert [block.block_id for block in hits] == [0, 1, 2]
    assert bm.allocate_slots(b, 1, computed_blocks=hits) == [3]
    assert [block.ref_cnt for block in bm.blocks[:4]] == [2, 2, 2, 1]
    # A bookkeeping bug that sent a back into its shared blocks would overwrite b's K/V.
    a.num_computed_tokens = 8
    with pytest.raises(RuntimeError, match="would write into block 2, shared by 2 requests"):
        bm.allocate_slots(a, 4)
    b.num_computed_tokens = 4
    with pytest.raises(RuntimeError, match="would write into block 1, shared by 2 requests"):
        bm.allocate_slots(b, 1)
    b.num_computed_tokens = 12
    assert bm.allocate_slots(b, 2) == []  # its own block 3 has room
    a.num_computed_tokens = 12
    assert bm.allocate_slots(a, 1) == [4]
    assert [block.ref_cnt for block in bm.blocks[:5]] == [2, 2, 2, 1, 1]


def test_usage_and_sizes():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert bm.num_blocks == 8 and bm.usage == 0.0
    bm.allocate_slots(make_request("a"), 8)
    assert bm.usage == pytest.approx(0.25)
    assert bm.num_required_blocks(0) == 0
    assert bm.num_required_blocks(4) == 1
    assert bm.num_required_blocks(5) == 2


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="need num_blocks >= 1 and block_size >= 1, got 0, 4"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="got 4, 0"):
        BlockManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 1, got 0"):
        BlockManager(num_blocks=4, block_size=4).allocate_slots(make_request("a"), 0)
    smallest = BlockManager(num_blocks=1, block_size=1)  # the smallest pool is a valid one
    assert smallest.allocate_slots(make_request("a"), 1) == [0]


def test_hits_apply_only_to_a_request_holding_no_blocks():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(12))
    a = Request("a", prompt + [5], SamplingParams(max_tokens=8))
    bm.allocate_slots(a, 13)
    assert bm.get_computed_blocks(a) == []  # its own cached blocks are no hits for it
    b = Request("b", prompt + [6], SamplingParams(max_tokens=8))
    c = Request("c", prompt + [7], SamplingParams(max_tokens=8))
    bm.allocate_slots(b, 1)
    with pytest.raises(RuntimeError, match="request 'b' already holds blocks; no hits apply"):
        bm.allocate_slots(b, 1, computed_blocks=bm.get_computed_blocks(c))


def test_lookups_and_evictions_accumulate():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    bm.record_lookup(8, 4)
    bm.record_lookup(6, 4)
    assert (bm.stats.num_queried_tokens, bm.stats.num_hit_tokens) == (14, 8)
    assert bm.stats.hit_rate == pytest.approx(8 / 14)
    a = Request("a", list(range(12)), SamplingParams(max_tokens=4))
    bm.allocate_slots(a, 12)
    bm.free(a)  # three cached blocks wait in the free queue: 3, then 2, 1, 0
    bm.allocate_slots(Request("b", list(range(500, 516)), SamplingParams(max_tokens=4)), 16)
    assert bm.stats.num_evicted_blocks == 3  # b took all four blocks, the three cached among them
    off = BlockManager(num_blocks=4, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    off.record_lookup(8, 4)
    assert (off.stats.num_queried_tokens, off.stats.hit_rate) == (0, 0.0)


def test_can_allocate_leaves_no_watermark_by_default():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert bm.can_allocate(4) and not bm.can_allocate(5)
    assert bm.allocate_slots(make_request("a"), 16) == [0, 1, 2, 3]


def test_reset_forgets_exactly_the_cached_blocks_no_request_holds():
    bm = BlockManager(num_blocks=10, block_size=BLOCK_SIZE)
    freed = Request("freed", list(range(100, 108)) + [1], SamplingParams(max_tokens=4))
    held = Request("held", list(range(200, 212)) + [1], SamplingParams(max_tokens=4))
    shared = Request("shared", list(range(200, 212)) + [2], SamplingParams(max_tokens=4))
    bm.allocate_slots(freed, 9)
    bm.free(freed)  # its two full blocks stay cached with ref_cnt 0
    bm.allocate_slots(held, 13)
    hits = bm.get_computed_blocks(shared)
    bm.allocate_slots(shared, 1, computed_blocks=hits[:1])  # held's first block: ref_cnt 2
    assert sorted(block.ref_cnt for block in bm.blocks if block.block_hash) == [0, 0, 1, 1, 2]
    assert bm.reset_prefix_cache() == 2
    assert bm.get_computed_blocks(Request("x", freed.prompt_token_ids, SamplingParams(max_tokens=1))) == []
    again = bm.get_computed_blocks(Request("y", held.prompt_token_ids, SamplingParams(max_tokens=1)))
    assert [block.block_id for block in again] == bm.get_block_ids("held")[:3]


def test_a_block_computed_twice_is_cached_once_and_the_copy_never():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    a = Request("a", prompt + [50, 51, 52, 53], SamplingParams(max_tokens=4))
    b = Request("b", prompt + [60], SamplingParams(max_tokens=4))
    assert bm.allocate_slots(a, 6) == [0, 1]  # a chunk: block 0 full (cached), block 1 not yet
    a.num_computed_tokens = 6
    hits = bm.get_computed_blocks(b)
    assert [block.block_id for block in hits] == [0]
    assert bm.allocate_slots(b, 5, computed_blocks=hits) == [2, 3]  # b computes tokens 4..7 first
    b.num_computed_tokens = 9
    assert bm.allocate_slots(a, 3) == [4]  # a's block 1 now holds the same tokens as b's block 2
    a.num_computed_tokens = 9
    bm.free(b)
    filler = Request("filler", list(range(900, 920)), SamplingParams(max_tokens=4))
    assert bm.allocate_slots(filler, 20) == [5, 6, 7, 3, 2]  # evicts b's block 2
    assert bm.allocate_slots(a, 3) == []  # a fills its block 4, which is cached now
    # a's copy of tokens 4..7 was never cached, and is not later either: a lookup stops before it.
    lookup = Request("c", a.prompt_token_ids + [99], SamplingParams(max_tokens=4))
    assert [block.block_id for block in bm.get_computed_blocks(lookup)] == [0]


def check_invariants(bm: BlockManager, live: dict[str, Request], num_tokens: dict[str, int]):
    held = [block_id for req_id in live for block_id in bm.get_block_ids(req_id)]
    assert len(held) == len(set(held)), "a block is held by two live requests"
    assert set(held).isdisjoint(bm.free_block_ids)
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    for block in bm.blocks:
        assert block.ref_cnt == (1 if block.block_id in set(held) else 0)
    for req_id in live:
        assert len(bm.get_block_ids(req_id)) == bm.num_required_blocks(num_tokens[req_id])


def test_fuzz_random_allocate_grow_free():
    rng = random.Random(1234)
    bm = BlockManager(num_blocks=11, block_size=BLOCK_SIZE)
    live: dict[str, Request] = {}
    num_tokens: dict[str, int] = {}
    num_created = num_failures = 0
    while num_created < 1000 or live:
        op = rng.random()
        if num_created < 1000 and op < 0.4:
            request = make_request(f"r{num_created}")
            num_created += 1
            num_prompt_tokens = rng.randint(1, 20)
            free_before = bm.free_block_ids
            if bm.allocate_slots(request, num_prompt_tokens) is None:
                num_failures += 1
                assert bm.free_block_ids == free_before
                continue
            live[request.req_id] = request
            num_tokens[request.req_id] = num_prompt_tokens
        elif live and op < 0.75:
            request = live[rng.choice(sorted(live))]
            request.num_computed_tokens = num_tokens[request.req_id]
            grow = rng.randint(1, 9)
            free_before = bm.free_block_ids
            if bm.allocate_slots(request, grow) is None:
                num_failures += 1
                assert bm.free_block_ids == free_before
            else:
                num_tokens[request.req_id] += grow
        elif live:
            request = live.pop(rng.choice(sorted(live)))
            del num_tokens[request.req_id]
            bm.free(request)
        check_invariants(bm, live, num_tokens)
    assert num_failures > 50  # the pool really was contended
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm.free_block_ids) == list(range(bm.num_blocks))
