"""The OpenAI gateway without a model: request checks, error mapping, SSE framing of errors.

The gateway here points at a closed port, so anything that reaches the server is a 503; a 400
proves the gateway rejected the request itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from gateway_svc.app import create_app
from gateway_svc.cli import add_gateway_arguments, config_from_args
from gateway_svc.config import GatewayConfig
from gateway_svc.errors import from_rpc_error
from gateway_svc.responses import ChatFormat
from gateway_svc.streaming import sse_events
from gateway_svc.translate import usage
from omnibus.v1 import generation_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def http():
    with TestClient(create_app(GatewayConfig(target="127.0.0.1:1"))) as client:
        yield client


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def assert_openai_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if param is not None:
        assert param in error["message"]
    return error


def test_no_server_is_503_on_health_and_models(http):
    assert http.get("/health").status_code == 503
    error = assert_openai_error(http.get("/v1/models"), 503, None)
    assert error["code"] == "unavailable"


@pytest.mark.parametrize("extra, param", [
    ({"n": 0}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": -1}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {"-5": 1.0}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"repetition_penalty": "x"}, "repetition_penalty"),
    ({"frequency_penality": 1.0}, "frequency_penality"),  # a misspelt name is not ignored
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_completion_request_rejected_before_the_server(http, extra, param):
    body = {"model": "m", "prompt": "Hello", **extra}
    response = http.post("/v1/completions", json=body, headers={"X-Request-Id": "req-7"})
    assert_openai_error(response, 400, param)
    assert response.headers["x-request-id"] == "req-7"


@pytest.mark.parametrize("extra, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"top_logprobs": 3}, "top_logprobs"),  # only with logprobs
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_request_rejected_before_the_server(http, extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **extra}
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_malformed_body_and_request_id(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, None)
    response = http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "a\tb"})
    assert_openai_error(response, 400, "X-Request-Id")
    assert_openai_error(http.get("/v1/nothing"), 404, None)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (grpc.StatusCode.INTERNAL, 500),
])
def test_grpc_status_maps_to_http_status(code, status):
    assert from_rpc_error(rpc_error(code, "something")).status == status


def test_server_field_names_become_openai_params():
    error = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1], got 2"))
    assert (error.status, error.param, error.message) == (400, "top_p", "sampling.top_p: must be in (0, 1], got 2")
    renamed = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: too many"),
                             {"sampling.max_tokens": "max_completion_tokens"})
    assert renamed.param == "max_completion_tokens"
    assert from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: bad")).param == "prompt"


class FakeCall:
    """A Generate call that yields `responses`, then fails with `error`."""

    def __init__(self, responses: list[pb.GenerateResponse], error: grpc.aio.AioRpcError):
        self.responses, self.error, self.cancelled = list(responses), error, False

    async def read(self):
        if self.responses:
            return self.responses.pop(0)
        raise self.error

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_error_after_the_stream_started_is_an_error_event_without_done():
    first = pb.GenerateResponse(token_ids=[1], text="Hi")
    call = FakeCall([pb.GenerateResponse(token_ids=[2], text=" there")],
                    rpc_error(grpc.StatusCode.UNAVAILABLE, "the worker died"))

    async def run() -> list[str]:
        return [event async for event in sse_events(call, first, ChatFormat("chatcmpl-1", "m", 0), True)]

    events = asyncio.run(run())
    payloads = [json.loads(event.removeprefix("data: ")) for event in events]
    assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["delta"]["content"] for p in payloads[1:3]] == ["Hi", " there"]
    assert payloads[-1]["error"]["message"] == "the worker died"
    assert payloads[-1]["error"]["code"] == "unavailable"
    assert call.cancelled


def test_usage_reports_cached_prompt_tokens():
    message = pb.Usage(prompt_tokens=40, completion_tokens=5, cached_prompt_tokens=32)
    assert usage(message) == {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                              "prompt_tokens_details": {"cached_tokens": 32}}


def test_flags_make_the_config():
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    config = config_from_args(parser.parse_args(["--target", "gpu-box:50051", "--port", "9000", "--request-timeout", "30"]))
    assert (config.target, config.host, config.port, config.request_timeout_s, config.use_tls) == (
        "gpu-box:50051", "127.0.0.1", 9000, 30.0, False)
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(["--tls-cert", __file__]))  # a certificate without its key


@pytest.mark.parametrize("command", [["clients.cli", "gateway"], ["gateway_svc"]])
def test_commands_offer_the_gateway_flags(command):
    run = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "--target" in run.stdout and "--port" in run.stdout
