"""Python client for the Omnibus gRPC API: an async iterator over chunks, and sync helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc

from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc


@dataclass(slots=True)
class Sampling:
    """Client-side sampling options; None leaves the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def to_proto(self) -> pb.SamplingParams:
        message = pb.SamplingParams(stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(message, name, value)
        return message


@dataclass(slots=True)
class Completion:
    """A whole generation, collected from its stream."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: list[int] | None = None,
    messages: list[tuple[str, str]] | None = None,
    sampling: Sampling | None = None,
    request_id: str = "",
    priority: int = 0,
    cache_salt: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one kind of input (the server checks that too).

    `priority`: lower runs first; `cache_salt`: only requests with equal salts share prefix-cache blocks.
    """
    request = pb.GenerateRequest(request_id=request_id, sampling=(sampling or Sampling()).to_proto(),
                                 priority=priority, cache_salt=cache_salt)
    if prompt is not None:
        request.prompt = prompt
    if prompt_token_ids is not None:
        request.prompt_token_ids.extend(prompt_token_ids)
    for role, content in messages or []:
        request.messages.add(role=role, content=content)
    return request


def collect(responses) -> Completion:
    text, token_ids, last = [], [], None
    for response in responses:
        text.append(response.text)
        token_ids.extend(response.token_ids)
        last = response
    return _completion(text, token_ids, last)


async def acollect(responses) -> Completion:
    text, token_ids, last = [], [], None
    async for response in responses:
        text.append(response.text)
        token_ids.extend(response.token_ids)
        last = response
    return _completion(text, token_ids, last)


def _completion(text: list[str], token_ids: list[int], last: pb.GenerateResponse | None) -> Completion:
    if last is None or last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        raise RuntimeError("the stream ended without a finish reason")
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    return Completion("".join(text), token_ids, reason, last.usage.prompt_tokens, last.usage.completion_tokens)


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` to verify the server (None: the system's
    roots), `cert` and `key` for a server that requires client certificates (mTLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key go together")

    def read(path):
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


class OmnibusClient:
    """Blocking client. `generate` streams responses; `complete` returns the whole text.

    Plain text by default; pass `credentials` (see `tls_credentials`) for a TLS server.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        if channel is None:
            channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        self.channel = channel
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout)

    def complete(self, prompt: str | None = None, timeout: float | None = None, **kwargs) -> Completion:
        return collect(self.generate(build_request(prompt, **kwargs), timeout=timeout))

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def close(self) -> None:
        self.channel.close()


class AsyncOmnibusClient:
    """asyncio client: `async for response in client.generate(request)`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        if channel is None:
            channel = (grpc.aio.insecure_channel(target) if credentials is None
                       else grpc.aio.secure_channel(target, credentials))
        self.channel = channel
        self.stub = pb_grpc.GenerationStub(self.channel)

    def generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        return self.stub.Generate(request, timeout=timeout)

    async def complete(self, prompt: str | None = None, timeout: float | None = None, **kwargs) -> Completion:
        return await acollect(self.generate(build_request(prompt, **kwargs), timeout=timeout))

    async def close(self) -> None:
        await self.channel.close()
