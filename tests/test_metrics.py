"""Prometheus metrics of a live server move by exactly what one request did; request ids are echoed."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread, collect_tokens, greedy_request

pytestmark = pytest.mark.model

NUM_KV_BLOCKS = 64


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=NUM_KV_BLOCKS, metrics_port=0).start()
    yield running
    running.stop()


def scrape(server: ServerThread) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    port = server.call(lambda app: app.metrics_port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_one_request_moves_the_metrics_by_what_it_did(server):
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 2541]
    before = scrape(server)
    tokens, _, last = collect_tokens(server.stub(), greedy_request(prompt, max_tokens=6))
    after = scrape(server)
    assert last.usage.completion_tokens == len(tokens) == 6
    assert moved(before, after, "omnibus_generation_tokens_total") == 6
    assert moved(before, after, "omnibus_prompt_tokens_total") == len(prompt)
    assert moved(before, after, "omnibus_requests_total", code="OK") == 1
    for histogram in ("omnibus_time_to_first_token_seconds", "omnibus_e2e_request_latency_seconds",
                      "omnibus_request_queue_time_seconds"):
        assert moved(before, after, f"{histogram}_count") == 1, histogram
    assert moved(before, after, "omnibus_inter_token_latency_seconds_count") == 5
    assert moved(before, after, "omnibus_e2e_request_latency_seconds_sum") > 0
    # Finished and idle again: nothing running or waiting, every block back in the pool.
    for gauge in ("omnibus_num_requests_running", "omnibus_num_requests_waiting", "omnibus_kv_cache_usage_ratio",
                  "omnibus_num_requests_swapped", "omnibus_prefix_cache_hit_rate"):
        assert after[(gauge, ())] == 0, gauge
    assert ("omnibus_preemptions_total", ()) in after


def test_rejected_request_counts_its_status_code(server):
    before = scrape(server)
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub().Generate(pb.GenerateRequest(prompt=""), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server)
    assert moved(before, after, "omnibus_requests_total", code="INVALID_ARGUMENT") == 1
    assert moved(before, after, "omnibus_requests_total", code="OK") == 0


def test_gauges_show_a_running_request(server):
    stub = server.stub()
    call = stub.Generate(greedy_request([1, 2, 3, 4], max_tokens=400), timeout=120)
    next(call)
    during = scrape(server)
    call.cancel()
    assert during[("omnibus_num_requests_running", ())] == 1
    assert during[("omnibus_kv_cache_usage_ratio", ())] > 0


def test_request_id_from_field_or_header_is_echoed_and_recorded(server):
    stub = server.stub()
    with_field = greedy_request([1, 2, 3], max_tokens=1)
    with_field.request_id = "field-id-1"
    _, _, last = collect_tokens(stub, with_field)
    assert last.request_id == "field-id-1"
    call = stub.Generate(greedy_request([1, 2, 3], max_tokens=1), metadata=(("x-request-id", "header-id-2"),),
                         timeout=60)
    responses = list(call)
    assert responses[-1].request_id == "header-id-2"
    assert ("x-request-id", "header-id-2") in call.trailing_metadata()
    call = stub.Generate(greedy_request([1, 2, 3], max_tokens=1), timeout=60)
    generated = list(call)[-1].request_id
    assert len(generated) == 32 and ("x-request-id", generated) in call.trailing_metadata()
    ids = server.call(lambda app: [r.client_request_id for r in app.engine.request_records])
    assert {"field-id-1", "header-id-2", generated} <= set(ids)
    rejected = stub.Generate(pb.GenerateRequest(prompt=""), metadata=(("x-request-id", "bad-3"),), timeout=30)
    with pytest.raises(grpc.RpcError):
        list(rejected)
    assert ("x-request-id", "bad-3") in rejected.trailing_metadata()
    unprintable = greedy_request([1, 2, 3], max_tokens=1)
    unprintable.request_id = "caf\u00e9\n"
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(unprintable, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("request_id:")
