"""Issue 13, gateway side: a body-size limit (413) and a bound on generations in flight (429), both
before the server is asked (2); gRPC's message-size RESOURCE_EXHAUSTED answered 413, not the full
queue's retryable 429 (8). The gateway points at a closed port: whatever reaches it is a 503."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import pytest
from fastapi.testclient import TestClient

from gateway_svc.app import create_app
from gateway_svc.cli import add_gateway_arguments, config_from_args
from gateway_svc.config import GatewayConfig
from gateway_svc.errors import from_rpc_error
from gateway_svc.limits import LimitsMiddleware

LIMIT = 4096


@pytest.fixture(scope="module")
def http():
    with TestClient(create_app(GatewayConfig(target="127.0.0.1:1", max_body_bytes=LIMIT))) as client:
        yield client


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


# 8: message-size violations are the client's, and final.

@pytest.mark.parametrize("details", [
    "SERVER: Received message larger than max (9437201 vs. 8388608)",  # the server's receive limit
    "CLIENT: Sent message larger than max (70000000 vs. 67108864)",  # the gateway channel's send limit
])
def test_grpc_message_size_errors_are_413(details):
    error = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, details))
    assert (error.status, error.code) == (413, "request_too_large")
    assert "Retry-After" not in error.response().headers


def test_a_full_queue_is_still_429_and_an_oversized_answer_is_not_the_clients_fault():
    full = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "the request queue is full: 1024 waiting"))
    assert full.status == 429 and full.response().headers["Retry-After"] == "1"
    answer = from_rpc_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      "CLIENT: Received message larger than max (70000000 vs. 67108864)"))
    assert answer.status == 502


# 2: the body-size limit, with and without a Content-Length.

def test_a_body_over_the_limit_is_413_before_the_server(http):
    body = {"prompt": "x" * LIMIT}
    response = http.post("/v1/completions", json=body, headers={"X-Request-Id": "big-1"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"] == "big-1"


def test_a_chunked_body_over_the_limit_is_413(http):
    chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(8))
    response = http.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text


def test_a_body_within_the_limit_reaches_the_server(http):
    response = http.post("/v1/completions", json={"prompt": "x" * (LIMIT - 100)})
    assert response.status_code == 503  # the server is down: the gateway let it through


# 2: at most max_concurrent_requests generations in flight; health and models are not counted.

class BlockingApp:
    """An ASGI app that answers 200 once `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app, path: str) -> int:
    """Send one POST through `app`; the HTTP status it answers."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    sent = []

    async def receive():
        return messages.pop() if messages else await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


async def test_generations_in_flight_are_bounded():
    inner = BlockingApp()
    app = LimitsMiddleware(inner, max_body_bytes=LIMIT, max_concurrent_requests=2, headers_of=lambda request: {})
    first = [asyncio.ensure_future(call(app, path)) for path in ("/v1/completions", "/v1/chat/completions")]
    while inner.entered < 2:
        await asyncio.sleep(0.01)
    assert await call(app, "/v1/completions") == 429
    health = asyncio.ensure_future(call(app, "/health"))  # not counted: it gets through
    while inner.entered < 3:
        await asyncio.sleep(0.01)
    inner.release.set()
    assert await asyncio.gather(*first, health) == [200, 200, 200]
    assert app.num_in_flight == 0
    assert await call(app, "/v1/completions") == 200


def test_flags_set_the_gateway_limits():
    parser = argparse.ArgumentParser()
    add_gateway_arguments(parser)
    config = config_from_args(parser.parse_args(["--max-body-bytes", "1000", "--max-concurrent-requests", "3"]))
    assert (config.max_body_bytes, config.max_concurrent_requests) == (1000, 3)
    assert GatewayConfig().max_body_bytes == 8 * 1024 * 1024
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(["--max-concurrent-requests", "0"]))
    assert "--max-body-bytes" in parser.format_help() and "--max-concurrent-requests" in parser.format_help()
