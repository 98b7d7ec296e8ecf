"""The gateway's one gRPC channel to the Omnibus server, and the calls it makes on it."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from fastapi import Request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import tls_credentials
from gateway_svc.config import GatewayConfig
from gateway_svc.errors import ClientGone, OpenAIError, from_rpc_error
from gateway_svc.translate import Generations
from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc

HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "omnibus.v1.Generation"
UNARY_TIMEOUT_S = 5.0
HEALTH_TIMEOUT_S = 2.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Pings find a server that vanished under a long stream (the server allows one per 10 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class Upstream:
    """Owns the channel (create it on the serving event loop: grpc.aio binds it to that loop)."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        if config.use_tls:
            credentials = tls_credentials(config.tls_ca, config.tls_cert, config.tls_key)
            self.channel = grpc.aio.secure_channel(config.target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(config.target, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._model_info: pb.ModelInfo | None = None

    async def model_info(self, refresh: bool = False) -> pb.ModelInfo:
        """The served model, cached: it changes only when the server restarts with another."""
        if self._model_info is None or refresh:
            try:
                self._model_info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=UNARY_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error) from None
        return self._model_info

    async def served_model(self, requested: str | None) -> str:
        """The served model's id; OpenAI's 404 model_not_found when `requested` names another."""
        info = await self.model_info()
        if requested not in (None, info.model_id):
            info = await self.model_info(refresh=True)
        if requested not in (None, info.model_id):
            raise OpenAIError(404, f"The model `{requested}` does not exist; this server serves `{info.model_id}`.",
                              param="model", code="model_not_found")
        return info.model_id

    async def is_serving(self) -> bool:
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        try:
            reply = await self.health.Check(request, timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def generate(self, request: pb.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(request, timeout=self.config.request_timeout_s)

    async def close(self) -> None:
        await self.channel.close()


async def collect(call: grpc.aio.UnaryStreamCall, n: int = 1) -> Generations:
    """Read the `n` whole generations of a call (raises AioRpcError when the call fails)."""
    generations = Generations(n)
    while (response := await call.read()) is not grpc.aio.EOF:
        generations.add(response)
    if not generations.finished:
        raise OpenAIError(500, "the generation stream ended without a finish reason", type="server_error")
    return generations


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, call: grpc.aio.UnaryStreamCall):
    """Cancel `call` if the HTTP client leaves while the block waits on it (uvicorn does not cancel
    the handler, and the server would generate for nobody); the block then raises ClientGone.
    A block that fails in any other way cancels the call too."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        call.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not watcher.done():  # this handler itself was cancelled, not the call
            call.cancel()
            raise
        raise ClientGone() from None  # reading a locally cancelled call raises CancelledError
    except BaseException:
        call.cancel()
        raise
    finally:
        watcher.cancel()
