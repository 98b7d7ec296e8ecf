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
    with pytest.raises(RuntimeError, match="ref_cnt 0"):
        bm.free(a)


def test_usage_and_sizes():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert bm.num_blocks == 8 and bm.usage == 0.0
    bm.allocate_slots(make_request("a"), 8)
    assert bm.usage == pytest.approx(0.25)
    assert bm.num_required_blocks(0) == 0
    assert bm.num_required_blocks(4) == 1
    assert bm.num_required_blocks(5) == 2


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=4).allocate_slots(make_request("a"), 0)


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
