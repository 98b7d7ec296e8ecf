"""SLA tiers on the real server and model: a high-priority request preempts a full batch within a
few steps without changing the preempted outputs (transformers' greedy tokens are the
reference), and fair share keeps a tenant's request out from behind another tenant's flood (under
`fcfs` it waits behind it).

Steps, not seconds, are what the first test counts: the low requests stream one token per step,
so the tokens they stream while the high-priority request waits are the steps it waited.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.server_harness import ServerThread, greedy_request
from tests.greedy_reference import assert_matches_reference

pytestmark = pytest.mark.model

LOW_PROMPTS = [[1, 504, 3458, 282, 4053, 314, 253, 1789, 30, 2], [1, 9690, 314, 253, 1345, 282, 4126, 47, 2]]
LOW_TOKENS = 40


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=128, max_num_seqs=2, heartbeat_timeout_s=120).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def fcfs_server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=128, max_num_seqs=2, scheduling_policy="fcfs",
                           heartbeat_timeout_s=120).start()
    yield running
    running.stop()


def greedy_reference(model, prompt: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (eos ignored: a plain argmax loop over its KV cache) and the
    top-2 logit gap at each step."""
    tokens, gaps, past, input_ids = [], [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(num_tokens):
            out = model(input_ids, cache=past, use_cache=True)
            top2 = out.logits[0, -1].topk(2)
            tokens.append(int(top2.indices[0]))
            gaps.append(float(top2.values[0] - top2.values[1]))
            past, input_ids = out.cache, top2.indices[:1].view(1, 1)
    return tokens, gaps


def stream(stub, request, into: list[tuple[float, list[int]]]) -> list[tuple[float, list[int]]]:
    """Appends (arrival time, token ids) of each response of one generation to `into`, as they come."""
    for response in stub.Generate(request, timeout=120):
        if response.token_ids:
            into.append((time.monotonic(), list(response.token_ids)))
    return into


def tokens_of(timed: list[tuple[float, list[int]]]) -> list[int]:
    return [t for _, ids in timed for t in ids]


def test_a_high_priority_request_preempts_a_full_batch_within_a_few_steps(server, hf_default_model, one_torch_thread):
    stub = server.stub()
    lows = []
    for prompt in LOW_PROMPTS:
        request = greedy_request(prompt, LOW_TOKENS)
        request.priority = 1
        lows.append(request)
    low_timed: list[list[tuple[float, list[int]]]] = [[], []]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream, stub, r, into) for r, into in zip(lows, low_timed)]
        deadline = time.monotonic() + 60
        while min(len(t) for t in low_timed) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)  # both decoding: the batch is full
        sent = time.monotonic()
        high_timed = stream(stub, greedy_request([1, 30, 2], 2), [])
        for future in futures:
            future.result()
    first_token = high_timed[0][0]
    for timed in low_timed:
        waited_steps = sum(len(ids) for t, ids in timed if sent < t < first_token)
        remaining = sum(len(ids) for t, ids in timed if t > first_token)
        assert waited_steps <= 4, f"the high-priority request waited {waited_steps} steps"
        assert remaining >= 20, "the low requests were nearly done: nothing was shown"
    causes = server.call(lambda app: dict(app.engine.scheduler.num_preemptions_by_cause))
    assert causes["priority"] >= 1
    for prompt, timed in zip(LOW_PROMPTS, low_timed):
        expected, gaps = greedy_reference(hf_default_model, prompt, LOW_TOKENS)
        assert_matches_reference(tokens_of(timed), expected, gaps, "preempted low-priority request")
    forecast_tokens = server.call(lambda app: app.metrics.registry.get_sample_value(
        "omnibus_admission_forecast_tokens_total"))
    assert forecast_tokens >= sum(len(p) + LOW_TOKENS for p in LOW_PROMPTS)


def flood_then_one(server: ServerThread) -> tuple[list[float], float]:
    """Tenant "flood" sends 12 requests at once, tenant "other" one a moment later: the flood's
    TTFTs and the other's."""
    stub = server.stub()
    flood = []
    for i in range(12):
        request = greedy_request([1, 504, 3458, 282, 4053 + i, 2], 8)
        request.tenant = "flood"
        flood.append(request)
    other = greedy_request([1, 9690, 314, 253, 2], 8)
    other.tenant = "other"
    started = threading.Event()

    def send(request) -> float:
        sent = time.monotonic()
        started.set()
        first = next(r for r in stub.Generate(request, timeout=120) if r.token_ids)
        assert first is not None
        return time.monotonic() - sent

    with ThreadPoolExecutor(13) as pool:
        flood_ttfts = [pool.submit(send, r) for r in flood]
        started.wait(10)
        deadline = time.monotonic() + 30
        while server.call(lambda app: app.engine.scheduler.num_waiting) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        other_ttft = pool.submit(send, other).result()
        return [f.result() for f in flood_ttfts], other_ttft


def test_fair_share_serves_a_tenant_before_another_tenants_flood(server):
    flood, other = flood_then_one(server)
    assert other < 0.4 * max(flood), f"other tenant's TTFT {other:.2f} s, the flood's last {max(flood):.2f} s"


def test_under_fcfs_a_tenant_waits_behind_another_tenants_flood(fcfs_server):
    flood, other = flood_then_one(fcfs_server)
    assert other > 0.8 * max(flood), f"other tenant's TTFT {other:.2f} s, the flood's last {max(flood):.2f} s"
