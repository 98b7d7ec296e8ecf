"""Automatic prefix caching on tiny pools: exact hits, shared and evicted blocks, salts.

Blocks hold 4 tokens. The fake worker (tests/test_scheduler.py) reads every context back through
the block table from a fake KV pool, so a hit on the wrong block changes the output and every
test below also checks outputs against the uncontended reference.
"""

from __future__ import annotations

import hashlib
import sys

import pytest

from scheduler_svc import block_hash
from scheduler_svc.block_hash import extend_block_hashes
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.request import Request, SamplingParams
from tests.test_scheduler import NO_EOS, Harness, make_request, reference_output


def request(req_id: str, prompt: list[int], max_tokens: int = 2, salt: str = "") -> Request:
    return Request(req_id, list(prompt), SamplingParams(max_tokens=max_tokens), NO_EOS, cache_salt=salt)


def run_to_completion(h: Harness) -> None:
    while h.scheduler.has_unfinished_requests():
        h.step()


def assert_reference_outputs(*requests: Request) -> None:
    for r in requests:
        assert r.output_token_ids == reference_output(request(r.req_id, r.prompt_token_ids, r.sampling_params.max_tokens), 64)[0]


PROMPT = list(range(100, 110))  # two full blocks and a tail of 2 tokens


def test_a_later_request_reuses_the_full_blocks_of_a_running_one():
    h = Harness(num_kv_blocks=10)
    a = request("a", PROMPT, max_tokens=4)
    h.add(a)
    plan, _ = h.step()
    assert plan.new_requests[0].block_ids == [0, 1, 2]
    b = request("b", PROMPT + [7])
    h.add(b)
    plan, _ = h.step()
    [new_b] = plan.new_requests
    assert (new_b.num_computed_tokens, new_b.num_new_tokens, new_b.block_ids) == (8, 3, [0, 1, 3])
    bm = h.scheduler.block_manager
    assert [bm.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert b.num_cached_tokens == 8
    assert (bm.stats.num_queried_tokens, bm.stats.num_hit_tokens) == (10 + 11, 8)
    run_to_completion(h)
    assert_reference_outputs(a, b)
    assert bm.num_free_blocks == 10


def test_a_hit_never_covers_the_last_token_so_shared_blocks_are_never_written():
    h = Harness(num_kv_blocks=10)
    prompt = list(range(200, 208))  # exactly two full blocks
    a, b = request("a", prompt), request("b", prompt)
    h.add(a)
    h.step()
    h.add(b)
    plan, _ = h.step()
    [new_b] = plan.new_requests
    # b's second block is a's too, but b must compute token 7 to sample: it gets a fresh block
    # and recomputes tokens 4..7 rather than writing into the shared one.
    assert (new_b.num_computed_tokens, new_b.num_new_tokens, new_b.block_ids) == (4, 4, [0, 3])
    run_to_completion(h)
    assert_reference_outputs(a, b)


def test_requests_admitted_in_the_same_step_share_blocks_cached_by_that_step():
    h = Harness(num_kv_blocks=10)
    a, b = request("a", PROMPT), request("b", PROMPT)
    h.add(a, b)
    plan, _ = h.step()
    assert [(r.req_id, r.num_computed_tokens, r.num_new_tokens, r.block_ids) for r in plan.new_requests] == [
        ("a", 0, 10, [0, 1, 2]),
        ("b", 8, 2, [0, 1, 3]),  # the worker writes a step's K/V before any attention reads it
    ]
    run_to_completion(h)
    assert_reference_outputs(a, b)


def test_a_newcomer_hits_a_block_a_running_request_fills_in_the_same_step():
    h = Harness(num_kv_blocks=10, max_num_batched_tokens=10)
    prompt = list(range(100, 114))
    a, b = request("a", prompt), request("b", prompt[:12] + [7, 8])
    h.add(a)
    assert h.step_tokens() == {"a": 10}  # blocks 0 and 1 full, block 2 half
    h.add(b)
    plan, _ = h.step()  # a fills block 2; b hits blocks 0-2 and samples in this same step
    [new_b] = plan.new_requests
    assert (new_b.num_computed_tokens, new_b.num_new_tokens, new_b.block_ids[:3]) == (12, 2, [0, 1, 2])
    run_to_completion(h)
    assert_reference_outputs(a, b)


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_tail_first():
    h = Harness(num_kv_blocks=10)
    prompt = list(range(300, 313))  # three full blocks and one token
    a = request("a", prompt, max_tokens=1)
    h.add(a)
    run_to_completion(h)
    bm = h.scheduler.block_manager
    assert bm.free_block_ids == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]  # tail first: block 3 goes first
    assert bm.num_cached_blocks == 3  # blocks 0-2 are full; block 3 holds one token
    filler = request("filler", list(range(500, 529)), max_tokens=1)  # 8 blocks: takes 3 and 2
    h.add(filler)
    run_to_completion(h)
    assert bm.stats.num_evicted_blocks == 1  # block 3 was never cached; block 2 was
    again = request("again", prompt, max_tokens=1)
    h.add(again)
    plan, _ = h.step()
    [new] = plan.new_requests
    assert (new.num_computed_tokens, new.block_ids[:2]) == (8, [0, 1])
    run_to_completion(h)
    assert_reference_outputs(a, filler, again)


def test_different_salts_share_no_block_and_equal_salts_do():
    h = Harness(num_kv_blocks=12)
    a, b, c = (request(name, PROMPT, salt=salt) for name, salt in (("a", "alice"), ("b", "bob"), ("c", "alice")))
    h.add(a)
    h.step()
    h.add(b, c)
    plan, _ = h.step()
    blocks = {r.req_id: r.block_ids for r in plan.new_requests}
    assert blocks["b"] == [3, 4, 5] and set(blocks["b"]).isdisjoint(h.scheduler.block_manager.get_block_ids("a"))
    assert blocks["c"][:2] == [0, 1]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (0, 8)
    run_to_completion(h)
    assert_reference_outputs(a, b, c)


def test_a_recompute_preempted_request_resumes_from_its_cached_blocks():
    h = Harness(num_kv_blocks=7)
    h.add(make_request("a", 7, max_tokens=3), make_request("b", 7), make_request("c", 7))
    h.step()
    h.step()
    h.step()  # a takes block 6; b needs a block, so c is preempted (frees 5, 4); a finishes
    c = h.scheduler.get_request("c")
    assert c.num_preemptions == 1
    assert h.scheduler.block_manager.get_block_ids("b") == [2, 3, 5]  # evicted c's tail block
    plan, _ = h.step()
    [resumed] = plan.new_requests
    assert (resumed.req_id, resumed.num_computed_tokens, resumed.block_ids[0]) == ("c", 4, 4)
    assert c.num_cached_tokens == 0  # usage counts only what the first admission found
    run_to_completion(h)
    assert c.output_token_ids == reference_output(make_request("c", 7), 64)[0]


def test_prefix_caching_off_finds_nothing():
    h = Harness(num_kv_blocks=10, enable_prefix_caching=False)
    a, b = request("a", PROMPT), request("b", PROMPT)
    h.add(a, b)
    plan, _ = h.step()
    assert [r.block_ids for r in plan.new_requests] == [[0, 1, 2], [3, 4, 5]]
    assert h.scheduler.block_manager.num_cached_blocks == 0
    assert h.scheduler.block_manager.stats.num_queried_tokens == 0  # no hit rate to report


def test_reset_forgets_only_blocks_no_request_holds():
    h = Harness(num_kv_blocks=10)
    h.add(request("a", PROMPT, max_tokens=1))
    run_to_completion(h)
    h.add(request("b", list(range(600, 610)), max_tokens=5))
    h.step()
    bm = h.scheduler.block_manager
    assert bm.num_cached_blocks == 4
    assert bm.reset_prefix_cache() == 2  # a's two freed blocks; b's are in use
    assert bm.num_cached_blocks == 2


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_block_hashes_follow_the_documented_construction(monkeypatch):
    """block_hash.py's rule written out by hand: the root is SHA-256 of the process root and the
    UTF-8 salt; block i's hash is SHA-256 of block i-1's hash then its token ids, each as a 4-byte
    unsigned integer in the machine's byte order (little-endian here)."""
    if sys.byteorder != "little":
        pytest.skip("the hand-written token bytes below are little-endian")
    process_root = bytes(range(16))
    monkeypatch.setattr(block_hash, "_PROCESS_ROOT", process_root)
    tokens = [1, 2, 3, 258, 49151, 0, 7, 2**32 - 1, 5, 6]  # two full blocks and a tail
    root = sha256(process_root + b"tenant-\xc3\xa9")  # "tenant-é" in UTF-8
    first = sha256(root + bytes.fromhex("01000000" "02000000" "03000000" "02010000"))
    second = sha256(first + bytes.fromhex("ffbf0000" "00000000" "07000000" "ffffffff"))
    assert block_hash.salt_root("tenant-é") == root
    hashes: list[bytes] = []
    block_hash.extend_block_hashes(hashes, tokens, 4, "tenant-é", 1)
    assert hashes == [first]
    block_hash.extend_block_hashes(hashes, tokens, 4, "tenant-é", 2)  # grows incrementally
    assert hashes == [first, second]
    block_hash.extend_block_hashes(hashes, tokens, 4, "tenant-é", 2)  # already covered
    assert hashes == [first, second]


def test_a_prompt_differing_at_one_position_shares_only_the_blocks_before_it():
    """Changing any single token of a prompt keeps the blocks before its block and no other."""
    cached = list(range(100, 112)) + [7]  # three full blocks and one token
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate_slots(request("cached", cached), len(cached))
    assert bm.get_block_ids("cached") == [0, 1, 2, 3] and bm.num_cached_blocks == 3
    for position in range(12):
        prompt = list(cached)
        prompt[position] = 99
        other = request(f"differs-at-{position}", prompt)
        hits = bm.get_computed_blocks(other)
        assert [block.block_id for block in hits] == [0, 1, 2][: position // 4], position
    same = bm.get_computed_blocks(request("same", cached))
    assert [block.block_id for block in same] == [0, 1, 2]


def test_a_prompt_differing_inside_a_cached_block_computes_that_block_itself():
    h = Harness(num_kv_blocks=10)
    a = request("a", [1, 2, 3, 4, 5, 6], max_tokens=4)
    h.add(a)
    h.step()
    b = request("b", [1, 2, 3, 99, 5, 6])  # differs from a only in the last token of block 0
    h.add(b)
    plan, _ = h.step()
    [new_b] = plan.new_requests
    assert (new_b.num_computed_tokens, new_b.block_ids) == (0, [2, 3])
    assert b.num_cached_tokens == 0
    run_to_completion(h)
    assert_reference_outputs(a, b)


def test_chained_hashes_name_the_whole_prefix():
    tokens = list(range(12))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, tokens, 4, "", 3)
    other: list[bytes] = []
    extend_block_hashes(other, [99] + tokens[1:], 4, "", 3)
    assert other[1] != hashes[1] and other[2] != hashes[2]  # same tokens there, other prefix
    salted: list[bytes] = []
    extend_block_hashes(salted, tokens, 4, "tenant", 1)
    assert salted[0] != hashes[0]
