"""The OpenAI-compatible HTTP app: its routes, and the gRPC channel it holds for its lifetime.

The `model` field must name the served model (GetModelInfo's model_id) or be omitted; any other
name is OpenAI's 404 model_not_found, so a client pointed at the wrong server learns it at once.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import grpc
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from gateway_svc import streaming, structured_output, translate
from gateway_svc.config import GatewayConfig
from gateway_svc.errors import OpenAIError, from_rpc_error, install_error_handlers
from gateway_svc.limits import LimitsMiddleware
from gateway_svc.responses import ChatFormat, CompletionFormat, ResponseFormat
from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest, GenerateBody
from gateway_svc.upstream import Upstream, cancel_on_disconnect, collect
from omnibus.v1 import generation_pb2 as pb

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 256  # the server's limit: the id goes back in gRPC metadata and into logs

router = APIRouter()


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app; its channel to `config.target` opens at startup and closes at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.upstream = Upstream(config)  # on the serving loop, which grpc.aio binds it to
        app.state.started = int(time.time())
        try:
            yield
        finally:
            await app.state.upstream.close()

    app = FastAPI(title="Omnibus OpenAI-compatible API", lifespan=lifespan)
    install_error_handlers(app, echo_headers)
    app.add_middleware(LimitsMiddleware, max_body_bytes=config.max_body_bytes,
                       max_concurrent_requests=config.max_concurrent_requests, headers_of=echo_headers)
    app.include_router(router)
    return app


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the server's readiness for omnibus.v1.Generation is SERVING, else 503."""
    serving = await _upstream(request).is_serving()
    return JSONResponse({"status": "ok" if serving else "unavailable"}, status_code=200 if serving else 503)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    info = await _upstream(request).model_info(refresh=True)
    card = {"id": info.model_id, "object": "model", "created": request.app.state.started, "owned_by": "omnibus",
            "max_model_len": info.max_model_len}
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    request_id = request_id_of(request)
    body.check()
    model = await _upstream(request).served_model(body.model)
    fmt = CompletionFormat(f"cmpl-{request_id}", model, int(time.time()), body.return_token_ids, body.n or 1,
                           logprobs=body.logprobs is not None)
    return await _generate(request, body, translate.completion_request(body, request_id), fmt,
                           structured_output.renames(body))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    request_id = request_id_of(request)
    body.check()
    model = await _upstream(request).served_model(body.model)
    fmt = ChatFormat(f"chatcmpl-{request_id}", model, int(time.time()), body.return_token_ids, body.n or 1,
                     logprobs=body.logprobs)
    return await _generate(request, body, translate.chat_request(body, request_id), fmt,
                           {**translate.chat_renames(body), **structured_output.renames(body)})


async def _generate(request: Request, body: GenerateBody, message: pb.GenerateRequest, fmt: ResponseFormat,
                    renames: dict[str, str] | None = None) -> Response:
    """Run one generation. A stream's first response is read before answering, so that a request
    the server rejects gets its HTTP status (400, 429, ...) rather than a 200 with an error event."""
    call = _upstream(request).generate(message)
    try:
        async with cancel_on_disconnect(request, call):
            if not body.stream:
                return JSONResponse(fmt.full(await collect(call, fmt.n)), headers=echo_headers(request))
            first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, renames) from None
    return StreamingResponse(
        streaming.sse_events(call, first, fmt, body.include_usage),
        media_type="text/event-stream",
        headers={**echo_headers(request), **streaming.HEADERS},
        background=BackgroundTask(call.cancel),  # runs when the client left mid-stream, too
    )


def request_id_of(request: Request) -> str:
    """The client's X-Request-Id (checked as the server checks it) or a fresh one; forwarded as
    the gRPC request_id so the server's log line and our response carry the same id."""
    request_id = request.headers.get(REQUEST_ID_HEADER)
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not _is_valid_request_id(request_id):
        raise OpenAIError(400, f"{REQUEST_ID_HEADER}: must be printable ASCII of at most "
                               f"{MAX_REQUEST_ID_CHARS} characters", param=REQUEST_ID_HEADER)
    request.state.request_id = request_id
    return request_id


def echo_headers(request: Request) -> dict[str, str]:
    """The request id to echo, also on errors found before the handler ran (an invalid body)."""
    request_id = getattr(request.state, "request_id", None) or request.headers.get(REQUEST_ID_HEADER)
    return {REQUEST_ID_HEADER: request_id} if request_id and _is_valid_request_id(request_id) else {}


def _is_valid_request_id(request_id: str) -> bool:
    return len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isascii() and request_id.isprintable()


def _upstream(request: Request) -> Upstream:
    return request.app.state.upstream
