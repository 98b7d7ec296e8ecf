"""Bounds the gateway enforces before a request reaches a route: body size and requests in flight.

A pure ASGI middleware, so that it sees the body as it arrives (a body over the limit is refused
with 413 without being held whole) and counts a streamed generation until its last byte is sent.
Only the generation routes count towards the bound on requests in flight: health checks and
model listings must keep answering while generations fill it.
"""

from __future__ import annotations

from typing import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_svc.errors import OpenAIError

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class LimitsMiddleware:
    """413 for a body over `max_body_bytes`; 429 (with Retry-After) while `max_concurrent_requests`
    generations are in flight. `headers_of(request)` adds headers to those answers (the request id)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_concurrent_requests: int,
                 headers_of: Callable[[Request], dict[str, str]]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_concurrent_requests = max_concurrent_requests
        self.headers_of = headers_of
        self.num_in_flight = 0  # one event loop serves the app: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope["path"] in GENERATION_PATHS
        if counted and self.num_in_flight >= self.max_concurrent_requests:
            await self._refuse(OpenAIError(
                429, f"too many requests in flight (at most {self.max_concurrent_requests}); retry shortly",
                type="rate_limit_error", code="too_many_requests"), scope, receive, send)
            return
        if _declared_length(scope) > self.max_body_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        if counted:
            self.num_in_flight += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            if counted:
                self.num_in_flight -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive, self.max_body_bytes)
        except _ClientLeft:
            return  # nobody to answer
        if body is None:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                           code="request_too_large")

    async def _refuse(self, error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
        await error.response(self.headers_of(Request(scope)))(scope, receive, send)


class _ClientLeft(Exception):
    """The client disconnected while sending its body."""


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # the server answers a malformed header itself
    return 0


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields the body read already, then the client's later messages
    (a disconnect, which the routes watch for)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
