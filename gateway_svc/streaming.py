"""Server-Sent Events for one streamed generation: OpenAI chunks, then `data: [DONE]`."""

from __future__ import annotations

import json
from typing import AsyncIterator

import grpc

from gateway_svc.errors import OpenAIError, from_rpc_error
from gateway_svc.responses import ResponseFormat
from gateway_svc.translate import finish_reason, total_usage
from omnibus.v1 import generation_pb2 as pb

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_events(
    call: grpc.aio.UnaryStreamCall,
    first: pb.GenerateResponse,
    fmt: ResponseFormat,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE body of a stream whose first response the caller has read (so that errors found
    before any token still get their own HTTP status). Once the status is sent an error can only
    travel in the stream: it goes as an error object, which the openai client raises, and the
    stream ends without [DONE]. Leaving early (the client disconnected) cancels the call."""
    try:
        for chunk in fmt.opening():
            yield sse(chunk)
        response, finished = first, {}  # choice index -> its usage
        while response is not grpc.aio.EOF:
            if response.text or (response.token_ids and (fmt.return_token_ids or fmt.logprobs)):
                yield sse(fmt.delta(response))
            reason = finish_reason(response)
            if reason is not None:
                finished[response.index] = response.usage
                yield sse(fmt.finish(response.index, reason))
            response = await call.read()
        if len(finished) != fmt.n:
            raise OpenAIError(500, "the generation stream ended without a finish reason", type="server_error")
        if include_usage:
            yield sse(fmt.usage_chunk(total_usage([finished[i] for i in sorted(finished)])))
        yield DONE
    except grpc.aio.AioRpcError as error:
        yield sse(from_rpc_error(error).body())
    except OpenAIError as error:
        yield sse(error.body())
    finally:
        call.cancel()  # a no-op once the call has ended
