"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and where they come from.

The `openai` client picks its exception class from the HTTP status alone, so the status is the
contract; `type`, `param` and `code` help a person reading the body.
"""

from __future__ import annotations

import re

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

# gRPC status -> (HTTP status, error type). Anything else is a 500.
_RPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
# gRPC's words when a request passes a message-size limit: the server's receive limit, or this
# channel's send limit. (A response too large for us reads "CLIENT: Received ...".)
_REQUEST_TOO_LARGE = re.compile(r"^(SERVER: )?Received message larger|^(CLIENT: )?Sent message larger")
# The server names fields as in the proto; a client wants the OpenAI parameter it sent.
_PARAM_NAMES = {"prompt_token_ids": "prompt", "request_id": "X-Request-Id"}


class OpenAIError(Exception):
    """An HTTP error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = dict(headers or {})
        if self.status == 429:
            headers["Retry-After"] = "1"  # the queue drains in steps; the openai client honours this
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def from_rpc_error(error: grpc.aio.AioRpcError, renames: dict[str, str] | None = None) -> OpenAIError:
    """The OpenAI error for a failed gRPC call. `renames` maps server field names to the
    parameter the client used (chat's `max_completion_tokens` travels as `sampling.max_tokens`)."""
    message = error.details() or error.code().name
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in message:
        # gRPC's own message-size check shares the full queue's code (429), but no retry can help.
        if _REQUEST_TOO_LARGE.search(message):
            return OpenAIError(413, f"the request is too large for the server: {message}", code="request_too_large")
        return OpenAIError(502, f"the server's answer is too large: {message}", type="server_error")
    status, kind = _RPC_STATUS.get(error.code(), (500, "server_error"))
    param = None
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT and ": " in message:
        param = _param_name(message.split(": ", 1)[0], renames or {})
    code = None if status == 400 else error.code().name.lower()
    return OpenAIError(status, message, type=kind, param=param, code=code)


def _param_name(field: str, renames: dict[str, str]) -> str:
    if field in renames:
        return renames[field]
    field = field.removeprefix("sampling.")
    return _PARAM_NAMES.get(field, field)


def from_validation_error(error: RequestValidationError) -> OpenAIError:
    """A 400 naming the first invalid field of the JSON body."""
    first = error.errors()[0]
    loc = [part for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        return OpenAIError(400, f"the request body is not valid JSON: {detail}")
    if not loc:
        return OpenAIError(400, "a JSON object is required as the request body")
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    message = "unrecognized request argument" if first["type"] == "extra_forbidden" else first["msg"]
    return OpenAIError(400, f"{param}: {message}", param=param)


def install_error_handlers(app: FastAPI, headers_of) -> None:
    """Answer every error as an OpenAI error object; `headers_of(request)` adds headers (the request id)."""

    async def openai_error(request: Request, error: OpenAIError):
        return error.response(headers_of(request))

    async def invalid_body(request: Request, error: RequestValidationError):
        return from_validation_error(error).response(headers_of(request))

    async def client_gone(request: Request, error: ClientGone):  # nobody reads it; nginx's code
        return Response(status_code=499)

    async def http_error(request: Request, error: HTTPException):  # unknown path, wrong method
        return OpenAIError(error.status_code, str(error.detail)).response(headers_of(request))

    async def unexpected(request: Request, error: Exception):  # Starlette re-raises it, so uvicorn logs it
        return OpenAIError(500, "internal error in the gateway", type="server_error").response(headers_of(request))

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
