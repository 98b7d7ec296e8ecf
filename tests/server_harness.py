"""Runs a real Omnibus server (scheduler in a thread of the test process, worker as a child process).

Tests talk to it over gRPC on loopback like any client, and may read the engine's records through
`ServerThread.call`, which runs a function on the server's event loop.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import grpc

from benchmarks.rank_processes import free_port
from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc
from scheduler_svc.app import ServingApp, ServingOptions

T = TypeVar("T")


class ServerThread:
    """An Omnibus server on an ephemeral loopback port, started and stopped by a test fixture."""

    def __init__(
        self, model_dir: Path, num_kv_blocks: int, credentials: grpc.ChannelCredentials | None = None,
        worker_args: list[str] | None = None, **options
    ):
        """`options` go to ServingOptions, `worker_args` to the worker's command line;
        `credentials` are what `channel()` and `stub()` use (TLS)."""
        self.model_dir = model_dir
        self.num_kv_blocks = num_kv_blocks
        # One torch thread: on a small shared machine (CI has 2 cores) a worker whose OpenMP
        # threads compete with the test process and the scheduler spins and runs up to 20x slower.
        self.worker_args = ["--num-threads", "1", *(worker_args or [])]
        self.credentials = credentials
        self.options = ServingOptions(model_dir=model_dir, model_id="test-model", port=0, **options)
        self.processes: list[subprocess.Popen] = []
        self.app: ServingApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready: Future = Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def start(self, timeout_s: float = 300) -> "ServerThread":
        self._thread.start()
        self._ready.result(timeout_s)
        return self

    def stop(self, timeout_s: float = 60) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def call(self, fn: Callable[[ServingApp], T], timeout_s: float = 30) -> T:
        """Run fn(app) on the server's loop, between two engine steps, and return its result."""

        async def run():
            return fn(self.app)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def call_async(self, fn: Callable[[ServingApp], Awaitable[T]]) -> Future:
        """Start the coroutine fn(app) on the server's loop; returns its concurrent Future."""

        async def run():
            return await fn(self.app)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def channel(self) -> grpc.Channel:
        """A channel to the server: plain text, or TLS with the harness's credentials."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel())

    def _spawn(self, endpoint: str) -> list[subprocess.Popen]:
        """One worker, or `world_size` tensor-parallel ranks meeting at a fresh rendezvous."""
        command = [
            sys.executable, "-m", "worker_svc", "--scheduler", endpoint, "--model", str(self.model_dir),
            "--device", "cpu", "--num-kv-blocks", str(self.num_kv_blocks), "--block-size", "16",
            "--parent-pid", str(os.getpid()), *self.worker_args,
        ]
        world_size = self.options.world_size
        if world_size == 1:
            self.processes = [subprocess.Popen(command)]
            return self.processes
        rendezvous = f"tcp://127.0.0.1:{free_port()}"
        self.processes = [
            subprocess.Popen([*command, "--rank", str(rank), "--world-size", str(world_size),
                              "--dist-init-method", rendezvous])
            for rank in range(world_size)
        ]
        return self.processes

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.app = ServingApp(self.options)
            await self.app.start(self._spawn)
        except BaseException as error:  # surface startup failures in the test, not the thread
            self._ready.set_exception(error)
            if self.app is not None:
                await self.app.stop(grace_s=0)
            return
        self._ready.set_result(None)
        await self._stop.wait()
        await self.app.stop(grace_s=1)


def greedy_request(prompt_token_ids: list[int], max_tokens: int, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=prompt_token_ids,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling),
    )


def collect_tokens(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, timeout_s: float = 300):
    """(token_ids, text, last response) of one streamed generation."""
    token_ids, text, last = [], [], None
    for response in stub.Generate(request, timeout=timeout_s):
        token_ids.extend(response.token_ids)
        text.append(response.text)
        last = response
    return token_ids, "".join(text), last
