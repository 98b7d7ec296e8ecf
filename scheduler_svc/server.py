"""The public gRPC service `omnibus.v1.Generation`, plus grpc.health.v1 and server reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc
from scheduler_svc import proto_convert
from scheduler_svc.engine import Engine, EngineError, ErrorKind
from scheduler_svc.proto_convert import InvalidArgument, ModelLimits
from scheduler_svc.scheduler import QueueFullError
from scheduler_svc.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "omnibus.v1.Generation"
_ERROR_CODES = {
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class GenerationService(pb_grpc.GenerationServicer):
    """Validates requests, hands them to the engine and streams the results back."""

    def __init__(self, tokenizer: ModelTokenizer, model_id: str):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.engine: Engine | None = None  # set once the workers have registered
        self.limits: ModelLimits | None = None
        self.model_info = pb.ModelInfo(model_id=model_id)
        self.draining = False

    def attach_engine(self, engine: Engine, limits: ModelLimits, model_info: pb.ModelInfo) -> None:
        self.engine, self.limits, self.model_info = engine, limits, model_info

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        engine = await self._ready_engine(context)
        try:
            parsed = proto_convert.parse_generate_request(request, self.tokenizer, self.limits)
            stream = engine.add_request(parsed)
        except InvalidArgument as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except QueueFullError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request queue is full: {error}")
        except EngineError as error:
            await context.abort(_ERROR_CODES[error.kind], str(error))
        try:
            async for event in stream.events():
                yield proto_convert.generate_response(
                    stream.client_request_id, event.token_ids, event.text, event.status, event.usage
                )
        except EngineError as error:
            await context.abort(_ERROR_CODES[error.kind], str(error))
        finally:
            if not stream.finished:  # client cancelled, deadline passed, or the engine failed
                engine.abort(stream.req_id)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        try:
            token_ids = self._tokenize(request)
        except InvalidArgument as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.TokenizeResponse(token_ids=token_ids, count=len(token_ids))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        await self._ready_engine(context)
        return self.model_info

    def _tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        has_text, has_messages = request.HasField("text"), len(request.messages) > 0
        if has_text == has_messages:
            raise InvalidArgument("text", "exactly one of text, messages is required")
        if has_text:
            return self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens)
        try:
            return self.tokenizer.encode_chat(proto_convert.parse_chat_turns(request.messages))
        except InvalidArgument:
            raise
        except ValueError as error:
            raise InvalidArgument("messages", str(error)) from None

    async def _ready_engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker has registered yet; retry shortly")
        if self.engine.dead_reason is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.engine.dead_reason)
        return self.engine


class HealthReporter:
    """Keeps the overall ("") and per-service health status in step."""

    def __init__(self, servicer: health.aio.HealthServicer):
        self.servicer = servicer

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, status)


def build_server(
    service: GenerationService, address: str, max_message_bytes: int = 64 * 1024 * 1024
) -> tuple[grpc.aio.Server, HealthReporter, int]:
    """A grpc.aio server with the Generation, health and reflection services; returns the bound port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Accept client keepalive pings on long idle streams instead of answering GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ])
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    return server, HealthReporter(health_servicer), port


async def wait_forever() -> None:
    await asyncio.Event().wait()
