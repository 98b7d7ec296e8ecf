"""Priorities on the real server: a low-priority request finishes while high-priority work floods in.

One sequence runs at a time and three clients keep resubmitting priority-0 requests, so there is
always high-priority work waiting. With 2 s of aging per level, the priority-2 request is overtaken
only by work that arrived less than 4 s after it; without aging it would wait forever.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.server_harness import ServerThread, collect_tokens, greedy_request

pytestmark = pytest.mark.model

PROMPT = [1, 504, 3458, 282, 4053, 314, 253, 1789, 30, 2]


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=128, max_num_seqs=1, priority_aging_s=2.0).start()
    yield running
    running.stop()


def test_low_priority_request_completes_under_a_flood_of_high_priority_work(server):
    stub = server.stub()
    stop = threading.Event()
    high: list[tuple[float, float]] = []  # (submitted, finished) of every high-priority request

    def flood() -> None:
        while not stop.is_set():
            submitted = time.monotonic()
            collect_tokens(stub, greedy_request(PROMPT, 4), timeout_s=120)
            high.append((submitted, time.monotonic()))

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        low_request = greedy_request(PROMPT, 4)
        low_request.priority = 2
        low_submitted = time.monotonic()
        tokens, _, last = collect_tokens(stub, low_request, timeout_s=120)
        low_finished = time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert len(tokens) == 4 and last.usage.completion_tokens == 4
    overtook = [s for s, f in high if s > low_submitted and f < low_finished]
    assert overtook, "no later high-priority request ran first: priorities had no effect"
    assert all(s < low_submitted + 4.0 + 1.0 for s in overtook), "overtaken by work that arrived too late"
