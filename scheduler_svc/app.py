"""The scheduler process: gRPC server up first, then workers register, then the engine serves.

Health stays NOT_SERVING until every worker has registered, and turns NOT_SERVING again when a
worker dies; requests in flight then end with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.proto_convert import ModelLimits
from scheduler_svc.protocol import WorkerHello
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.server import GenerationService, HealthReporter, build_server
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerGroup

logger = logging.getLogger(__name__)

# Spawns the worker processes given the scheduler's ZeroMQ endpoint (None: workers start elsewhere).
WorkerSpawner = Callable[[str], list[subprocess.Popen]]


@dataclass(slots=True)
class ServingOptions:
    model_dir: Path
    model_id: str
    host: str = "127.0.0.1"
    port: int = 50051
    worker_bind: str = "tcp://127.0.0.1:0"  # port 0: pick a free port (workers we spawn are told)
    world_size: int = 1
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_queued_requests: int = 1024
    enable_chunked_prefill: bool = True
    registration_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 15.0
    extra: dict = field(default_factory=dict)


class ServingApp:
    """Owns the gRPC server, the worker group and (once workers are up) the engine."""

    def __init__(self, options: ServingOptions):
        self.options = options
        self.tokenizer = ModelTokenizer(options.model_dir)
        self.service = GenerationService(self.tokenizer, options.model_id)
        self.server, self.health, self.port = build_server(self.service, f"{options.host}:{options.port}")
        self.workers = WorkerGroup(options.worker_bind, options.world_size, options.heartbeat_timeout_s)
        self.engine: Engine | None = None

    async def start(self, spawn_workers: WorkerSpawner | None = None) -> None:
        """Serve gRPC at once (NOT_SERVING), spawn workers, and wait for them to register."""
        await self.health.set(False)
        await self.server.start()
        logger.info("gRPC listening on %s:%d; waiting for %d worker(s) at %s",
                    self.options.host, self.port, self.options.world_size, self.workers.endpoint)
        await self.workers.start()
        if spawn_workers is not None:
            for process in spawn_workers(self.workers.endpoint):
                self.workers.watch_process(process)
        hellos = await self.workers.wait_registered(self.options.registration_timeout_s)
        self._start_engine(hellos)
        await self.health.set(True)
        logger.info("ready: serving %s on %s:%d", self.options.model_id, self.options.host, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        self.service.draining = True
        await self.health.set(False)
        await self.server.stop(grace_s)
        if self.engine is not None:
            await self.engine.stop()
        await self.workers.shutdown()

    def _start_engine(self, hellos: list[WorkerHello]) -> None:
        first = hellos[0]
        num_kv_blocks = min(h.num_kv_blocks for h in hellos)
        config = SchedulerConfig(
            num_kv_blocks=num_kv_blocks,
            max_model_len=first.max_model_len,
            block_size=first.block_size,
            max_num_seqs=self.options.max_num_seqs,
            max_num_batched_tokens=self.options.max_num_batched_tokens,
            max_queued_requests=self.options.max_queued_requests,
            enable_chunked_prefill=self.options.enable_chunked_prefill,
        )
        self.engine = Engine(Scheduler(config), self.workers, self.tokenizer, on_dead=self._on_engine_dead)
        limits = ModelLimits(
            vocab_size=first.vocab_size,
            max_model_len=first.max_model_len,
            kv_capacity_tokens=num_kv_blocks * first.block_size,
        )
        self.service.attach_engine(self.engine, limits, self._model_info(first, num_kv_blocks, len(hellos)))
        self.engine.start()

    def _model_info(self, hello: WorkerHello, num_kv_blocks: int, num_workers: int) -> pb.ModelInfo:
        return pb.ModelInfo(
            model_id=self.options.model_id,
            vocab_size=hello.vocab_size,
            max_model_len=hello.max_model_len,
            block_size=hello.block_size,
            num_kv_blocks=num_kv_blocks,
            num_workers=num_workers,
            device=hello.device,
            dtype=hello.dtype,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids),
            model_fingerprint=hello.model_fingerprint,
        )

    def _on_engine_dead(self, reason: str) -> None:
        asyncio.get_running_loop().create_task(self.health.set(False))
