"""The public gRPC service `omnibus.v1.Generation`, plus grpc.health.v1 and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc
from scheduler_svc import parallel_samples, proto_convert
from scheduler_svc.config import DEFAULT_MAX_REQUEST_BYTES, RequestLimits
from scheduler_svc.engine import Engine, EngineError, ErrorKind, RequestStream
from scheduler_svc.metrics import ServingMetrics
from scheduler_svc.proto_convert import InvalidArgument, ModelLimits, ParsedRequest
from scheduler_svc.scheduler import QueueFullError
from scheduler_svc.structured_output import Constraint, GrammarCompiler
from scheduler_svc.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "omnibus.v1.Generation"
_ERROR_CODES = {
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 256


class _Rejection(Exception):
    """Ends a Generate call with this status; raised where the reason is found, answered once."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class GenerationService(pb_grpc.GenerationServicer):
    """Validates requests, hands them to the engine and streams the results back.

    Tokenizing and chat rendering run on a thread pool, never on the event loop that every stream
    shares; what can be refused by its size alone is refused before that.
    """

    def __init__(self, tokenizer: ModelTokenizer, model_id: str, metrics: ServingMetrics | None = None,
                 request_limits: RequestLimits | None = None):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.request_limits = request_limits if request_limits is not None else RequestLimits()
        self.engine: Engine | None = None  # set once the workers have registered
        self.limits: ModelLimits | None = None
        self.grammar_compiler: GrammarCompiler | None = None  # set with the engine (it needs the vocab size)
        self.model_info = pb.ModelInfo(model_id=model_id)
        self.draining = False
        # tokenizers releases the GIL while it encodes, so these threads leave the loop free.
        self._tokenize_pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="tokenize")
        # Token texts for logprobs: each id decoded alone, once (a few microseconds each).
        self._token_text = functools.lru_cache(maxsize=1 << 16)(self._decode_token)

    def attach_engine(self, engine: Engine, limits: ModelLimits, model_info: pb.ModelInfo) -> None:
        self.engine, self.limits, self.model_info = engine, limits, model_info
        self.grammar_compiler = GrammarCompiler(self.tokenizer, limits.vocab_size)

    def close(self) -> None:
        """Stop the tokenizing threads (after the gRPC server has stopped)."""
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Stream one generation; every call ends counted in the outcome metric by status code."""
        request_id = request.request_id or _metadata_request_id(context) or uuid.uuid4().hex
        echo = ((REQUEST_ID_HEADER, request_id),) if _is_valid_request_id(request_id) else ()
        context.set_trailing_metadata(echo)
        code = grpc.StatusCode.CANCELLED  # unless the stream ends or is rejected: the client left
        try:
            # aclosing: a cancelled call must abort the engine request now, not when collected.
            async with contextlib.aclosing(self._generate(request, request_id)) as responses:
                async for response in responses:
                    yield response
            code = grpc.StatusCode.OK
        except _Rejection as rejection:
            code = rejection.code
            logger.info("request rejected request_id=%r code=%s: %s", request_id, code.name, rejection)
            await context.abort(code, str(rejection), trailing_metadata=echo)
        finally:
            remaining = context.time_remaining()
            if code == grpc.StatusCode.CANCELLED and remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            self.metrics.count_outcome(code.name)

    async def _generate(self, request: pb.GenerateRequest, request_id: str):
        self._ready_engine_or_reject()  # the limits to parse against come with the engine
        parsed = await self._parse(request, request_id)
        constraint = await self._compile_constraint(request.sampling)
        engine = self._ready_engine_or_reject()  # again: a drain or a death may have begun meanwhile
        streams: list[RequestStream] = []
        try:
            for sample in parallel_samples.split_samples(parsed):  # n requests, queued together
                streams.append(self._add_request(engine, sample, constraint))
            async for index, event in parallel_samples.merged_events(streams):
                yield proto_convert.generate_response(
                    request_id, event.token_ids, event.text, event.status, event.usage, index, event.logprobs,
                    self._token_text,
                )
        except EngineError as error:
            raise _Rejection(_ERROR_CODES[error.kind], str(error)) from None
        finally:
            for stream in streams:  # client cancelled, deadline passed, or the engine failed
                if not stream.finished:
                    engine.abort(stream.req_id)

    async def _parse(self, request: pb.GenerateRequest, request_id: str) -> ParsedRequest:
        if not _is_valid_request_id(request_id):
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT,
                             f"request_id: must be printable ASCII of at most {MAX_REQUEST_ID_CHARS} characters")
        try:
            proto_convert.check_generate_request(request, self.limits)
            parsed = await self._off_loop(proto_convert.parse_generate_request, request, self.tokenizer, self.limits)
        except InvalidArgument as error:
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        return dataclasses.replace(parsed, client_request_id=request_id)

    async def _compile_constraint(self, sampling: pb.SamplingParams) -> Constraint | None:
        """The request's structured-output constraint, compiled off the loop; None without one."""
        if sampling.WhichOneof("structured") is None:
            return None
        try:
            return await self._off_loop(self.grammar_compiler.compile, sampling)
        except InvalidArgument as error:
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _add_request(self, engine: Engine, parsed: ParsedRequest, constraint: Constraint | None = None) -> RequestStream:
        try:
            return engine.add_request(parsed, constraint)
        except QueueFullError as error:
            raise _Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request queue is full: {error}") from None
        except EngineError as error:
            raise _Rejection(_ERROR_CODES[error.kind], str(error)) from None

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        try:
            proto_convert.check_tokenize_request(request, self.request_limits)
            token_ids = await self._off_loop(self._tokenize, request)
        except InvalidArgument as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.TokenizeResponse(token_ids=token_ids, count=len(token_ids))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        await self._ready_engine(context)
        return self.model_info

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.tokenizer.decode([token_id], skip_special_tokens=False)

    def _tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        if request.HasField("text"):
            # Unset means what Generate does with a prompt: special tokens added (a BOS, say).
            add_special_tokens = not request.HasField("add_special_tokens") or request.add_special_tokens
            return self.tokenizer.encode(request.text, add_special_tokens=add_special_tokens)
        try:
            return self.tokenizer.encode_chat(proto_convert.parse_chat_turns(request.messages))
        except InvalidArgument:
            raise
        except ValueError as error:
            raise InvalidArgument("messages", str(error)) from None

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def _ready_engine(self, context: grpc.aio.ServicerContext) -> Engine:
        try:
            return self._ready_engine_or_reject()
        except _Rejection as rejection:
            await context.abort(rejection.code, str(rejection))

    def _ready_engine_or_reject(self) -> Engine:
        if self.draining:
            raise _Rejection(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.engine is None:
            raise _Rejection(grpc.StatusCode.UNAVAILABLE, "no worker has registered yet; retry shortly")
        if self.engine.dead_reason is not None:
            raise _Rejection(grpc.StatusCode.UNAVAILABLE, self.engine.dead_reason)
        return self.engine


class HealthReporter:
    """Keeps the overall ("") and per-service health status in step."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self.servicer = servicer
        self.serving: bool | None = None  # None: never set

    async def set(self, serving: bool) -> None:
        if serving == self.serving:
            return
        logger.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, status)


def _is_valid_request_id(request_id: str) -> bool:
    # It goes back in metadata, which takes printable ASCII only, and into every log line.
    return len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isascii() and request_id.isprintable()


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value
    return ""


def build_server(
    service: GenerationService,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    max_message_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> tuple[grpc.aio.Server, HealthReporter, int]:
    """A grpc.aio server with the Generation, health and reflection services; returns the bound port.

    With `credentials` the port speaks TLS only (plain-text clients fail the handshake). gRPC
    itself refuses a request over `max_message_bytes` (RESOURCE_EXHAUSTED, "Received message
    larger than max"), before it is parsed on the event loop.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Accept client keepalive pings on long idle streams instead of answering GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
        # Our own pings find clients that vanished without closing (a silent NAT drop).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ])
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    return server, HealthReporter(health_servicer), port


async def wait_forever() -> None:
    await asyncio.Event().wait()
