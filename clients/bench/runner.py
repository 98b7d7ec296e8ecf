"""Sends a workload to a server over gRPC at its arrival times and records every chunk's time."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass

import grpc

from clients.bench.metrics import RequestRecord, benchmark_duration
from clients.bench.workloads import MIN_TOKEN_ID, BenchRequest
from clients.client import AsyncOmnibusClient, Sampling, build_request
from omnibus.v1 import generation_pb2 as pb


@dataclass(slots=True)
class RunOptions:
    """How to drive the server; the workload and arrival offsets are given separately."""

    target: str
    max_concurrency: int | None = None
    num_warmups: int = 1
    request_timeout_s: float | None = None
    progress: bool = True


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion


async def fetch_model_info(target: str) -> pb.ModelInfo:
    """The server's GetModelInfo (vocabulary and context size for workloads; device for reports)."""
    client = AsyncOmnibusClient(target)
    try:
        return await client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    finally:
        await client.close()


async def run_workload(requests: list[BenchRequest], offsets: list[float], options: RunOptions) -> RunResult:
    """Send requests[i] at offsets[i] seconds after the start (waiting for a concurrency slot if
    max_concurrency is set, as vLLM does: the send time is taken once the slot is held)."""
    from tqdm import tqdm  # the `bench` extra; `omnibus serve` must not need it

    client = AsyncOmnibusClient(options.target)
    try:
        await _warm_up(client, options)
        semaphore = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
        with tqdm(total=len(requests), file=sys.stderr, disable=not options.progress, unit="req") as progress:
            start = time.perf_counter()
            tasks = [
                _fire(client, i, request, start + offset, semaphore, options, progress)
                for i, (request, offset) in enumerate(zip(requests, offsets, strict=True))
            ]
            records = await asyncio.gather(*tasks)
    finally:
        await client.close()
    _rebase(records, start)
    return RunResult(records, benchmark_duration(records))


async def _warm_up(client: AsyncOmnibusClient, options: RunOptions) -> None:
    # Untimed short requests first, so the first timed request does not pay for connection setup
    # or the server's first-step costs.
    for i in range(options.num_warmups):
        request = BenchRequest([MIN_TOKEN_ID + i] * 8, 4)
        record = await _send(client, -1, request, options.request_timeout_s)
        if record.error is not None:
            raise RuntimeError(f"warm-up request failed: {record.error}")


async def _fire(client, index, request, send_at, semaphore, options, progress) -> RequestRecord:
    await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
    async with semaphore or contextlib.nullcontext():
        record = await _send(client, index, request, options.request_timeout_s)
    progress.update(1)
    return record


async def _send(client: AsyncOmnibusClient, index: int, request: BenchRequest, timeout_s: float | None) -> RequestRecord:
    sampling = Sampling(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    message = build_request(prompt_token_ids=request.prompt_token_ids, sampling=sampling, request_id=f"bench-{index}",
                            priority=request.priority, cache_salt=request.cache_salt)
    record = RequestRecord(index, len(request.prompt_token_ids), request.max_tokens, send_time=time.perf_counter())
    try:
        async for response in client.generate(message, timeout=timeout_s):
            _observe(record, response, time.perf_counter())
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
        return record
    record.end_time = time.perf_counter()
    if not record.chunk_times:
        record.error = "EMPTY: the stream carried no tokens"
    return record


def _observe(record: RequestRecord, response: pb.GenerateResponse, now: float) -> None:
    if response.token_ids:
        record.chunk_times.append(now)
        record.chunk_tokens.append(len(response.token_ids))
    # The server's usage is authoritative; the chunk sum covers a stream cut short of its last message.
    if response.HasField("usage"):
        record.output_tokens = response.usage.completion_tokens
        record.cached_prompt_tokens = response.usage.cached_prompt_tokens
    else:
        record.output_tokens = sum(record.chunk_tokens)


def _rebase(records: list[RequestRecord], start: float) -> None:
    # Seconds from the benchmark's start read better in the JSON than raw perf_counter values.
    for record in records:
        record.send_time -= start
        record.chunk_times = [t - start for t in record.chunk_times]
        if record.end_time is not None:
            record.end_time -= start

