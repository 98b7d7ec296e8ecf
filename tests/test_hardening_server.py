"""Issue 13 against a live server: abusive requests are refused while another stream keeps its pace
(1, 2), and through the OpenAI gateway an oversized request is a 413 and an unbounded priority a 400
(8, 6). One server for the module: the real scheduler, gRPC server and worker group, in front of a
paced null worker (tests/hardening_support.py) and a tiny tokenizer. No model is loaded."""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest

from omnibus.v1 import generation_pb2 as pb
from tests.gateway_harness import GatewayThread
from tests.hardening_support import NullServerThread, write_tiny_model_dir

STEP_DELAY_S = 0.005
# A step takes ~5 ms; on a busy 2-core CI machine a gap of a few hundred ms happens. Tokenizing
# the 7 MiB prompt below on the event loop takes seconds.
MAX_GAP_S = 1.0
BIG_TEXT = "hello world, the quick brown fox. " * 210_000  # ~7 MiB: under the gRPC limit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    running = NullServerThread(model_dir, step_delay_s=STEP_DELAY_S).start()
    yield running
    running.stop()


class TimedStream:
    """A long generation read in a thread, with the arrival time of every response."""

    def __init__(self, stub, max_tokens: int = 60_000):
        request = pb.GenerateRequest(prompt="a steady stream",
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self.call = stub.Generate(request, timeout=120)
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.times.append(time.monotonic())
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def wait_for_tokens(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.times) < count:
            assert time.monotonic() < deadline, f"only {len(self.times)} tokens in {timeout_s} s"
            time.sleep(0.01)

    def max_gap(self, since: float) -> float:
        times = [t for t in self.times if t >= since]
        return max(b - a for a, b in zip(times, times[1:]))

    def stop(self) -> None:
        self.call.cancel()
        self._thread.join(10)


def abusive_requests() -> list[tuple[str, pb.GenerateRequest | pb.TokenizeRequest, str]]:
    """(rpc, request, the field its INVALID_ARGUMENT must name), built before timing starts."""
    many_messages = [pb.ChatMessage(role="user", content="hi")] * 200_000
    return [
        ("Generate", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[f"stop {i}" for i in range(20_000)])),
         "sampling.stop"),
        ("Generate", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[5] * 1_000_000)),
         "sampling.stop_token_ids"),
        ("Generate", pb.GenerateRequest(prompt=BIG_TEXT), "prompt"),
        ("Generate", pb.GenerateRequest(messages=many_messages), "messages"),
        ("Generate", pb.GenerateRequest(prompt_token_ids=[7] * 1_000_000), "prompt_token_ids"),
        ("Generate", pb.GenerateRequest(prompt="hi", priority=-(2**31)), "priority"),
        ("Tokenize", pb.TokenizeRequest(text=BIG_TEXT), "text"),
    ]


def test_abusive_requests_are_refused_while_a_stream_keeps_its_pace(server):
    stub = server.stub()
    abuse = abusive_requests()
    stream = TimedStream(stub)
    try:
        stream.wait_for_tokens(20)
        started = time.monotonic()
        for rpc, request, field in abuse:
            with pytest.raises(grpc.RpcError) as error:
                if rpc == "Generate":
                    list(stub.Generate(request, timeout=60))
                else:
                    stub.Tokenize(request, timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.value.details())
            assert error.value.details().startswith(f"{field}:"), error.value.details()
        num_before = len(stream.times)
        stream.wait_for_tokens(num_before + 20)
        gap = stream.max_gap(started)
    finally:
        stream.stop()
    assert gap < MAX_GAP_S, f"the stream stalled {gap:.2f} s while abusive requests were refused"


def test_gateway_answers_an_oversized_request_413_and_a_wild_priority_400(server):
    # The gateway's own body limit is raised here, so that the server's gRPC limit is what refuses.
    with GatewayThread(server.target, max_body_bytes=64 * 1024 * 1024) as gateway:
        big = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x" * (9 * 1024 * 1024)}, timeout=60)
        assert big.status_code == 413, big.text
        assert big.json()["error"]["code"] == "request_too_large"
        assert "Retry-After" not in big.headers  # the openai client must not retry it
        wild = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "hi", "priority": -(2**31)}, timeout=60)
        assert wild.status_code == 400 and wild.json()["error"]["param"] == "priority", wild.text
        fine = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "priority": -100},
                          timeout=60)
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 3, fine.text
