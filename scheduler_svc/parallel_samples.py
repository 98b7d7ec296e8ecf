"""`GenerateRequest.n`: one call, n independent samples of the same prompt.

Each sample is its own engine request with the same prompt, salt and priority. They are queued
together, so the scheduler admits them in the same step and the prefix cache hands the later ones
the full prompt blocks the first is computing (a shared block is reference-counted in the block
manager): the prompt is computed once, save the partial last block each sample computes itself.
Each sample draws from its own generator: with a seed, sample i gets `sample_seed(seed, i)`, so
every sample is reproducible and sample 0 equals the same request with n = 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator

from scheduler_svc.engine import RequestStream, StreamEvent
from scheduler_svc.proto_convert import ParsedRequest

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed` (64-bit, like the field)."""
    if index == 0:
        return seed
    # splitmix64's finaliser: neighbouring seeds and indices give unrelated seeds.
    x = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def split_samples(parsed: ParsedRequest) -> list[ParsedRequest]:
    """One request per sample, in index order; `parsed` itself when n is 1."""
    if parsed.n == 1:
        return [parsed]
    samples = []
    for index in range(parsed.n):
        sampling = parsed.sampling_params
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sample_seed(sampling.seed, index))
        samples.append(dataclasses.replace(parsed, sampling_params=sampling, n=1))
    return samples


async def merged_events(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(sample index, event) of every stream as they arrive, until all have finished. An engine
    error on any stream is raised at once; the caller aborts the others."""
    if len(streams) == 1:
        async for event in streams[0].events():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(index: int, stream: RequestStream) -> None:
        try:
            async for event in stream.events():
                queue.put_nowait((index, event))
        except Exception as error:  # an EngineError: handed to the reader
            queue.put_nowait((index, error))

    tasks = [asyncio.create_task(forward(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield index, item
            if item.status is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
