"""Bad requests get INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread, collect_tokens

pytestmark = pytest.mark.model

NUM_KV_BLOCKS = 64  # 1,024 tokens: small enough to test the capacity check


@pytest.fixture(scope="module")
def server(model_dir):
    # One sequence at a time and two queue places make the queue-full test deterministic.
    running = ServerThread(model_dir, num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=1, max_queued_requests=2).start()
    yield running
    running.stop()


def sampling(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**fields)


BAD_REQUESTS = {
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt"),
    "no input": (pb.GenerateRequest(), "prompt"),
    "two inputs": (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1, 2]), "prompt"),
    "prompt and messages": (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]), "prompt"),
    "message without role": (pb.GenerateRequest(messages=[pb.ChatMessage(role="", content="x")]), "messages[0].role"),
    "max_tokens 0": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=0)), "sampling.max_tokens"),
    "over the context": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=9000)), "sampling.max_tokens"),
    "over the KV pool": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=1500)), "sampling.max_tokens"),
    "prompt too long": (pb.GenerateRequest(prompt_token_ids=[42] * 9000), "prompt_token_ids"),
    "negative temperature": (pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=-0.5)), "sampling.temperature"),
    "nan temperature": (pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=float("nan"))), "sampling.temperature"),
    "top_p 0": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)), "sampling.top_p"),
    "top_p above 1": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=1.5)), "sampling.top_p"),
    "negative top_k": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_k=-1)), "sampling.top_k"),
    "token id too big": (pb.GenerateRequest(prompt_token_ids=[1, 49152]), "prompt_token_ids"),
    "stop token id too big": (pb.GenerateRequest(prompt="hi", sampling=sampling(stop_token_ids=[10**6])), "sampling.stop_token_ids"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_rejected_and_server_keeps_serving(server, case):
    request, field = BAD_REQUESTS[case]
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:"), error.value.details()
    tokens, _, last = collect_tokens(stub, pb.GenerateRequest(prompt="Hello", sampling=sampling(max_tokens=2, ignore_eos=True)))
    assert len(tokens) == 2 and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert server.call(lambda app: app.engine.scheduler.block_manager.num_free_blocks) == NUM_KV_BLOCKS


def test_full_queue_answers_resource_exhausted(server):
    stub = server.stub()
    long = pb.GenerateRequest(prompt="Tell me a long story.", sampling=sampling(max_tokens=900, ignore_eos=True))
    calls = [stub.Generate(long, timeout=120) for _ in range(8)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(c.done() for c in calls) < 5:
        time.sleep(0.05)
    time.sleep(0.5)  # give a wrongly rejected sixth call the chance to show up
    rejected = [c for c in calls if c.done()]
    codes = [c.code() for c in rejected]
    for call in calls:
        call.cancel()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5, codes  # 1 running + 2 queued are kept
    assert "queue is full" in rejected[0].details()


def test_tokenize_matches_generate_input(server):
    stub = server.stub()
    chat = [pb.ChatMessage(role="user", content="What is 2+2?")]
    tokenized = stub.Tokenize(pb.TokenizeRequest(messages=chat))
    _, _, last = collect_tokens(stub, pb.GenerateRequest(messages=chat, sampling=sampling(max_tokens=1)))
    assert tokenized.count == last.usage.prompt_tokens == len(tokenized.token_ids)
    with pytest.raises(grpc.RpcError) as error:
        stub.Tokenize(pb.TokenizeRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_info_health_and_reflection(server):
    stub = server.stub()
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.vocab_size, info.max_model_len, info.num_kv_blocks, info.block_size) == (49152, 8192, NUM_KV_BLOCKS, 16)
    assert info.device == "cpu" and list(info.eos_token_ids) == [2]
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "omnibus.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "omnibus.v1.Generation" in services and "grpc.health.v1.Health" in services
