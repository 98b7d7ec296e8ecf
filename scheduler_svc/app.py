"""The scheduler process: gRPC server up first, then workers register, then the engine serves.

Health (overall and `omnibus.v1.Generation`) is SERVING only while every worker is registered,
the engine is alive, the app is not draining, and the engine is not stalled (requests unfinished
but no step completed for `stall_timeout_s`). A drain lets requests in flight finish first.

A dead worker ends no request (engine.py resumes them). With workers it spawned (`omnibus serve`)
the app starts a dead one again, at most `max_worker_restarts` times in 10 minutes; past that, or if
a restarted worker does not register within `worker_restart_timeout_s`, the engine dies (requests
end with UNAVAILABLE, `dead` is set and the CLI exits 1). A scheduler alone waits for its workers.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.config import DEFAULT_MAX_REQUEST_BYTES, RequestLimits, SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.metrics import ServingMetrics
from scheduler_svc.proto_convert import ModelLimits
from scheduler_svc.protocol import WorkerHello
from scheduler_svc.restart_budget import RestartBudget
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.server import GenerationService, HealthReporter, build_server
from scheduler_svc.tls import TlsConfig, server_credentials
from scheduler_svc.tokenizer import ModelTokenizer
from scheduler_svc.worker_group import WorkerGroup
from scheduler_svc.worker_link_security import load_scheduler_keys

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
    # CURVE keys (omnibus keygen): only workers whose public key is there may register. Without
    # them a worker_bind other machines can reach is refused unless insecure_worker_link.
    worker_keys: Path | None = None
    insecure_worker_link: bool = False
    world_size: int = 1
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_queued_requests: int = 1024
    enable_chunked_prefill: bool = True
    scheduling: str = "continuous"  # or "static" (a baseline: a new batch only once the last is done)
    scheduling_policy: str = "priority"  # priority | sjf | fcfs (see SchedulerConfig)
    tenant_weights: dict[str, float] = field(default_factory=dict)  # fair share; unlisted weigh 1
    priority_preemption_guard_steps: int = 16
    fair_share_half_life_steps: int = 1000
    admission: str = "immediate"  # immediate | lifetime (see SchedulerConfig)
    enable_prefix_caching: bool = True
    priority_aging_s: float = 10.0  # seconds of waiting worth one priority level
    preemption_mode: str = "auto"  # auto | recompute | swap (see SchedulerConfig)
    registration_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 15.0
    metrics_port: int | None = None  # None: no /metrics endpoint; 0: any free port
    tls: TlsConfig | None = None  # None: plain-text gRPC
    stall_timeout_s: float = 60.0  # no step for this long with requests unfinished: NOT_SERVING
    # Workers we spawned that die are started again, at most this many times in 10 minutes.
    max_worker_restarts: int = 3
    # Requests are kept this long after losing the workers; then they fail with UNAVAILABLE
    # (and a spawned worker that has not registered again counts as failed to restart).
    worker_restart_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0  # how long a drain lets requests in flight finish
    # Lame-duck period at the start of a drain: readiness is NOT_SERVING but new requests are
    # still served, so a load balancer's health check can take us out of rotation first.
    drain_delay_s: float = 0.0
    # gRPC refuses a larger request (RESOURCE_EXHAUSTED) before parsing it; the per-field bounds
    # (input characters, messages, stop lists, priority) answer INVALID_ARGUMENT before tokenizing.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    extra: dict = field(default_factory=dict)


class ServingApp:
    """Owns the gRPC server, the worker group and (once workers are up) the engine."""

    def __init__(self, options: ServingOptions):
        self.options = options
        self.tokenizer = ModelTokenizer(options.model_dir)
        self.metrics = ServingMetrics()
        self.metrics.known_tenants = frozenset(options.tenant_weights)  # their own queue-time label
        self.service = GenerationService(self.tokenizer, options.model_id, self.metrics, options.request_limits)
        credentials = None if options.tls is None else server_credentials(options.tls)
        self.server, self.health, self.port = build_server(
            self.service, f"{options.host}:{options.port}", credentials, options.max_request_bytes
        )
        keys = None if options.worker_keys is None else load_scheduler_keys(options.worker_keys)
        self.workers = WorkerGroup(options.worker_bind, options.world_size, options.heartbeat_timeout_s,
                                   keys=keys, insecure=options.insecure_worker_link)
        self.engine: Engine | None = None
        self._health_task: asyncio.Task | None = None
        self._stalled = False
        self._stopped = False
        self._lame_duck = False
        self.dead = asyncio.Event()  # set when the engine dies (workers gone for good, or a bug)
        self._restart_budget = RestartBudget(options.max_worker_restarts)
        self._spawn_workers: WorkerSpawner | None = None
        self._spawned: list[subprocess.Popen] = []
        self._restart_task: asyncio.Task | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on, or None."""
        return self.metrics.port

    @property
    def draining(self) -> bool:
        return self.service.draining

    def is_ready(self) -> bool:
        """What readiness reports; see the module docstring."""
        engine = self.engine
        return (
            engine is not None
            and not self._lame_duck
            and not self.service.draining
            and engine.dead_reason is None
            and self.workers.is_registered  # no worker death since they last all registered
            and not engine.is_stalled(self.options.stall_timeout_s)
        )

    async def refresh_health(self) -> None:
        await self.health.set(self.is_ready())

    async def start(self, spawn_workers: WorkerSpawner | None = None) -> None:
        """Serve gRPC at once (NOT_SERVING), spawn workers, and wait for them to register."""
        await self.health.set(False)
        self._serve_metrics()
        await self.server.start()
        logger.info("gRPC listening on %s:%d%s; waiting for %d worker(s) at %s",
                    self.options.host, self.port, "" if self.options.tls is None else " (TLS)",
                    self.options.world_size, self.workers.endpoint)
        await self.workers.start()
        if spawn_workers is not None:
            self._spawn_workers = spawn_workers
            self._spawn()
        hellos = await self.workers.wait_registered(self.options.registration_timeout_s)
        self._start_engine(hellos)
        self._health_task = asyncio.create_task(self._watch_health(), name="health-watch")
        if spawn_workers is not None:
            self._restart_task = asyncio.create_task(self._restart_dead_workers(), name="worker-restarts")
        await self.refresh_health()
        logger.info("ready: serving %s on %s:%d", self.options.model_id, self.options.host, self.port)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Graceful stop (SIGTERM): turn NOT_SERVING, keep serving for `drain_delay_s` while load
        balancers notice, then refuse new requests with UNAVAILABLE, let requests in flight finish
        for up to `timeout_s` (default: the options'), and stop."""
        timeout_s = self.options.drain_timeout_s if timeout_s is None else timeout_s
        if self.options.drain_delay_s > 0:
            self._lame_duck = True
            await self.refresh_health()
            logger.info("draining: NOT_SERVING, still accepting requests for %.1f s", self.options.drain_delay_s)
            await asyncio.sleep(self.options.drain_delay_s)
        self.service.draining = True
        await self.refresh_health()
        if self.engine is not None and self.engine.num_active_requests:
            logger.info("draining: waiting up to %.0f s for %d request(s) in flight",
                        timeout_s, self.engine.num_active_requests)
            if not await self.engine.wait_idle(timeout_s):
                logger.warning("drain timed out; ending %d request(s) with UNAVAILABLE",
                               self.engine.num_active_requests)
        await self.stop()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop now: requests in flight end with UNAVAILABLE, then the server and workers stop."""
        if self._stopped:
            return
        self._stopped = True
        self.service.draining = True
        await self.health.set(False)
        if self._health_task is not None:
            self._health_task.cancel()
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.engine is not None:
            await self.engine.stop()  # fails what is left, so handlers answer before the server stops
        await self.server.stop(grace_s)  # lets handlers send their last message
        self.service.close()
        await self.workers.shutdown()
        self.metrics.close()

    def _serve_metrics(self) -> None:
        port = self.options.metrics_port
        if port is None:
            return
        try:
            self.metrics.serve(self.options.host, port)
        except OSError as error:
            # Metrics are not worth refusing traffic over; the log says why they are missing.
            logger.error("metrics: cannot listen on %s:%d (%s); serving without /metrics",
                         self.options.host, port, error)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            stalled = self.engine is not None and self.engine.is_stalled(self.options.stall_timeout_s)
            if stalled and not self._stalled:
                logger.warning("engine stalled: requests unfinished and no step completed for %.0f s",
                               self.options.stall_timeout_s)
            elif self._stalled and not stalled:
                logger.info("engine is making progress again")
            self._stalled = stalled
            await self.refresh_health()

    def _spawn(self) -> None:
        self._spawned = self._spawn_workers(self.workers.endpoint)
        for process in self._spawned:
            self.workers.watch_process(process)

    async def _restart_dead_workers(self) -> None:
        """Start the spawned workers again after each death, within the budget (module docstring)."""
        seen = self.workers.num_deaths
        while True:
            if self.workers.num_deaths == seen or self.workers.is_registered:
                seen = self.workers.num_deaths
                await self.workers.wait_change(None)
                continue
            seen = self.workers.num_deaths
            reason = self.workers.dead_reason
            if not self._restart_budget.take():
                self._give_up(f"{reason}; the worker was already restarted {self.options.max_worker_restarts} "
                              f"time(s) within {self._restart_budget.window_s / 60:.0f} minutes")
                return
            await self._kill_spawned()
            self._spawn()
            self.metrics.count_worker_restart()
            logger.warning("restarting the worker (pid %s) after: %s", [p.pid for p in self._spawned], reason)
            if not await self._registered_or_died_again(seen):
                self._give_up(f"the restarted worker did not register within "
                              f"{self.options.worker_restart_timeout_s:.0f} s (after: {reason})")
                return

    async def _registered_or_died_again(self, deaths: int) -> bool:
        """Wait for the restarted workers to register or die; False if neither happened in time."""
        deadline = asyncio.get_running_loop().time() + self.options.worker_restart_timeout_s
        while not self.workers.is_registered and self.workers.num_deaths == deaths:
            if not await self.workers.wait_change(deadline - asyncio.get_running_loop().time()):
                return False
        return True

    async def _kill_spawned(self) -> None:
        """Make sure no earlier worker lives on (one gone silent still holds its identity)."""
        # Unwatch them all first: a tensor-parallel rank that exits while its peers are killed is
        # the death being handled, not another one.
        for process in self._spawned:
            self.workers.unwatch_process(process)
        for process in self._spawned:
            if process.poll() is None:
                process.kill()
        for process in self._spawned:
            await asyncio.to_thread(process.wait, 10)

    def _give_up(self, reason: str) -> None:
        logger.error("giving up on the workers: %s", reason)
        if self.engine is not None:
            self.engine.die(reason)

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
            scheduling=self.options.scheduling,
            scheduling_policy=self.options.scheduling_policy,
            tenant_weights=dict(self.options.tenant_weights),
            priority_preemption_guard_steps=self.options.priority_preemption_guard_steps,
            fair_share_half_life_steps=self.options.fair_share_half_life_steps,
            admission=self.options.admission,
            enable_prefix_caching=self.options.enable_prefix_caching,
            priority_aging_s=self.options.priority_aging_s,
            preemption_mode=self.options.preemption_mode,
            num_swap_blocks=min(h.num_swap_blocks for h in hellos),
            kv_bytes_per_block=first.kv_bytes_per_block,
            swap_bytes_per_s=min(h.swap_bytes_per_s for h in hellos),
        )
        scheduler = Scheduler(config)
        scheduler.length_forecast.on_outcome = self.metrics.observe_admission_forecast
        self.engine = Engine(
            scheduler, self.workers, self.tokenizer, on_dead=self._on_engine_dead, metrics=self.metrics,
            worker_restart_timeout_s=self.options.worker_restart_timeout_s,
        )
        limits = ModelLimits(
            vocab_size=first.vocab_size,
            max_model_len=first.max_model_len,
            kv_capacity_tokens=num_kv_blocks * first.block_size,
            request=self.options.request_limits,
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
            kv_cache_dtype=hello.kv_cache_dtype or hello.dtype,  # a worker that does not say keeps the model's
        )

    def _on_engine_dead(self, reason: str) -> None:
        self.dead.set()
        asyncio.get_running_loop().create_task(self.refresh_health())
