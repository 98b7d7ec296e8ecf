"""The worker process: load the model, size the KV pool, then serve StepPlans over ZeroMQ.

A DEALER socket (identity `worker-<rank>`) talks to the scheduler's ROUTER: `WorkerHello` once,
then one `StepResult` or `WorkerError` per `StepPlan`. A second DEALER (`worker-<rank>-hb`), owned
by a heartbeat thread, beats while long steps run (torch releases the GIL inside its kernels).
Messages are msgspec msgpack, never pickle.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
from transformers import AutoConfig

from scheduler_svc import protocol
from scheduler_svc.worker_link_security import WorkerKeys, load_worker_keys, secure_worker_socket
from kernels.reference import AttentionOps
from worker_svc.backends import ATTENTION_BACKENDS, LINEAR_BACKENDS
from worker_svc.cpu_fused_ops import sampler_argmax, use_fused_cpu_ops
from worker_svc.cpu_linear import prepare_linears
from worker_svc.kv_cache import (
    KVCacheSpec,
    allocate_kv_caches,
    cpu_num_blocks,
    cuda_num_blocks,
)
from worker_svc.model_runner import ModelRunner
from worker_svc.model_store import DEFAULT_MODEL, load_model, model_fingerprint, prepare_model
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.parallel_config import DIST_BACKENDS, ParallelConfig, check_shardable
from worker_svc.process_group import join_group, leave_group
from worker_svc.swap_space import SwapSpace
from worker_svc.tensor_parallel import local_num_kv_heads, shard_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_DTYPES = {**_DTYPES, "int8": torch.int8}  # int8: values and a scale per row, kernels/int8_kv.py


@dataclass(slots=True)
class WorkerConfig:
    """Everything `python -m worker_svc` accepts; checked at construction."""

    scheduler: str  # ZeroMQ address of the scheduler's ROUTER, e.g. tcp://127.0.0.1:5555
    rank: int = 0
    world_size: int = 1
    model: str = DEFAULT_MODEL  # default name, .gguf file or model directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # The KV pool's element type: auto is the model's; a 16-bit cache under a float32 CPU model
    # halves the bytes attention reads and doubles the tokens the pool holds (llama.cpp's default),
    # an int8 one (a scale per row) reads 0.27x the float32 bytes and holds 3.8x the tokens.
    kv_cache_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | int8
    block_size: int = 16
    num_kv_blocks: int | None = None  # overrides the memory budget below
    kv_cache_memory_gb: float = 2.0  # CPU budget
    # Host memory for the KV blocks of swapped-out requests. None: 4 GiB beside a GPU, none on
    # a CPU worker (its pool is host memory already; recomputing is the only sensible preemption).
    swap_space_gb: float | None = None
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of total memory the worker may use
    max_num_batched_tokens: int = 8192  # size of the CUDA profiling step
    load_format: str = "auto"  # auto | safetensors | random
    heartbeat_interval: float = 1.0
    max_model_len: int | None = None  # defaults to the model's
    num_threads: int | None = None  # CPU torch threads; default: every usable core
    # auto: our C++ kernels on a CPU (the reference where they cannot be built), the torch
    # reference on a GPU until the CUDA kernels are verified | cpu | cuda | torch
    attention_backend: str = "auto"
    linear_backend: str = "auto"  # auto (blocks on a float32 CPU model) | blocks | onednn | torch
    parent_pid: int | None = None  # exit when this process (the scheduler that spawned us) is gone
    worker_keys: str | None = None  # CURVE key directory (omnibus keygen); None: a plain link
    # Tensor parallelism (world_size > 1): torch.distributed's rendezvous (tcp://HOST:PORT, env://),
    # the collective backend, and how long a collective may wait for a peer.
    dist_init_method: str | None = None
    dist_backend: str = "auto"  # auto | nccl | gloo
    dist_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.world_size > 1 and not self.dist_init_method:
            raise ValueError("world_size > 1 needs a dist_init_method (--dist-init-method tcp://HOST:PORT, "
                             "or MASTER_ADDR and MASTER_PORT for env://)")
        if self.dist_backend not in DIST_BACKENDS:
            raise ValueError(f"dist_backend {self.dist_backend!r} is not one of {DIST_BACKENDS}")
        if not self.dist_timeout_s > 0:
            raise ValueError("dist_timeout_s must be positive")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend {self.linear_backend!r} is not one of {LINEAR_BACKENDS}")
        if self.block_size <= 0 or self.heartbeat_interval <= 0:
            raise ValueError("block_size and heartbeat_interval must be positive")
        for name, allowed in (("dtype", _DTYPES), ("kv_cache_dtype", _KV_DTYPES)):
            value = getattr(self, name)
            if value != "auto" and value not in allowed:
                raise ValueError(f"{name} {value!r} is not auto or one of {sorted(allowed)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if self.swap_space_gb is not None and self.swap_space_gb < 0:
            raise ValueError("swap_space_gb must be >= 0")

    @property
    def identity(self) -> bytes:
        return f"worker-{self.rank}".encode()

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.rank, self.world_size)


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` is CUDA when available; a bare `cuda` picks the GPU of this rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, attention_backend: str,
                           device: torch.device) -> torch.dtype:
    """`auto` is the model's dtype. Another one needs kernels that read it: our CPU kernels take a
    16-bit or int8 cache under float32 queries, the torch reference any; the CUDA kernels only the
    model's."""
    if name == "auto":
        return model_dtype
    kv_dtype = _KV_DTYPES[name]
    if kv_dtype == model_dtype:
        return kv_dtype
    if model_dtype != torch.float32:
        raise ValueError(f"kv_cache_dtype {name} under a {dtype_name(model_dtype)} model: a cache dtype other "
                         "than the model's needs a float32 model")
    if attention_backend == "cuda" or (attention_backend == "auto" and device.type == "cuda"):
        raise ValueError(f"kv_cache_dtype {name}: the CUDA kernels read a cache of the model's dtype only")
    return kv_dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_runner(config: WorkerConfig) -> tuple[ModelRunner, protocol.WorkerHello]:
    """Load the model, allocate the KV pool and describe the worker to the scheduler."""
    started = time.perf_counter()
    device = resolve_device(config.device, config.rank)
    dtype = resolve_dtype(config.dtype, device)
    kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, config.attention_backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_dir = prepare_model(config.model, config.load_format)
    if config.world_size > 1:
        check_shardable(AutoConfig.from_pretrained(model_dir), config.world_size)  # before the rendezvous
        join_group(config.parallel, config.dist_init_method, config.dist_backend, device, config.dist_timeout_s)
    attn_ops = attention_ops(config.attention_backend, device)
    model = shard_model(load_model(model_dir, device, dtype, config.load_format, attn_ops), config.parallel)
    linear_backend = prepare_linears(model, config.linear_backend)  # after sharding: each rank's own slices
    elementwise_isa = None
    if config.attention_backend != "torch":  # `torch` is the plain reference throughout
        elementwise_isa = use_fused_cpu_ops(model)  # float32 CPU models only; elsewhere the torch ops stay
    max_model_len = _max_model_len(model, config.max_model_len)
    spec = KVCacheSpec(model.num_layers, config.block_size, local_num_kv_heads(model.config, config.world_size),
                       model.head_dim, kv_dtype)
    num_blocks = _num_kv_blocks(config, model, spec, device, max_model_len)
    kv_caches = allocate_kv_caches(spec, num_blocks, device)
    swap_space = _swap_space(config, spec, device)
    swap_bytes_per_s = 0.0 if swap_space is None else swap_space.measure_bytes_per_s(kv_caches, spec.bytes_per_block)
    runner = ModelRunner(model, kv_caches, config.block_size, device, config.rank,
                         max_model_len=max_model_len, swap_space=swap_space, world_size=config.world_size,
                         argmax=sampler_argmax(elementwise_isa))
    hello = protocol.WorkerHello(
        protocol_version=protocol.PROTOCOL_VERSION,
        rank=config.rank,
        world_size=config.world_size,
        pid=os.getpid(),
        num_kv_blocks=num_blocks,
        block_size=config.block_size,
        model_fingerprint=model_fingerprint(model_dir, config.load_format),
        max_model_len=max_model_len,
        vocab_size=model.vocab_size,
        device=str(device),
        dtype=dtype_name(dtype),
        num_swap_blocks=0 if swap_space is None else swap_space.num_blocks,
        kv_bytes_per_block=spec.bytes_per_block,
        swap_bytes_per_s=swap_bytes_per_s,
        kv_cache_dtype=dtype_name(kv_dtype),
    )
    logger.info(
        "worker %d of %d ready: model %s, device %s, dtype %s, linears %s, %d KV blocks of %d tokens "
        "(%s, %.2f GiB), max_model_len %d, loaded in %.1fs",
        config.rank, config.world_size, model_dir, hello.device, hello.dtype, linear_backend, num_blocks,
        config.block_size, dtype_name(kv_dtype),
        num_blocks * spec.bytes_per_block / (1 << 30), max_model_len,
        time.perf_counter() - started,
    )
    return runner, hello


def _swap_space(config: WorkerConfig, spec: KVCacheSpec, device: torch.device) -> SwapSpace | None:
    gib = config.swap_space_gb
    if gib is None:
        gib = 4.0 if device.type == "cuda" else 0.0
    num_blocks = int(gib * (1 << 30)) // spec.bytes_per_block
    return SwapSpace(spec, num_blocks, device) if num_blocks > 0 else None


def attention_ops(backend: str, device: torch.device) -> AttentionOps:
    """The attention implementation for `backend` on `device`.

    On a CPU, `auto` is our C++ kernels (`kernels/cpu`), or the torch reference with a warning
    where they cannot be built; `cpu` insists on them. On a GPU, `auto` stays on the torch
    reference until the CUDA kernels have passed their tests on real hardware (kernels/README.md);
    `cuda` opts in and needs CuPy. `torch` is the reference everywhere.
    """
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError("the cuda attention backend needs a CUDA device")
        import cupy  # noqa: F401  (fail now, not at the first step, when CuPy is missing)
        from kernels.cuda_ops import cuda_attention_ops

        return cuda_attention_ops()
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            raise ValueError("the cpu attention backend needs a CPU device")
        from kernels.cpu_ops import load_cpu_attention

        kernels, why_not = load_cpu_attention()
        if kernels is not None:
            logger.info("attention: CPU kernels (%s)", kernels.isa)
            return kernels.ops()
        if backend == "cpu":
            raise RuntimeError(f"the CPU attention kernels cannot be built here: {why_not}")
        logger.warning("attention: the CPU kernels cannot be built here (%s); using the slower torch "
                       "reference", why_not)
        return AttentionOps()
    if device.type == "cuda" and backend == "auto":
        logger.info("attention: torch reference (pass --attention-backend cuda for our kernels)")
    return AttentionOps()


def _max_model_len(model: LlamaForCausalLM, requested: int | None) -> int:
    if requested is None:
        return model.max_model_len
    if not 0 < requested <= model.max_model_len:
        raise ValueError(f"max_model_len {requested} must be in [1, {model.max_model_len}]")
    return requested


def _num_kv_blocks(config: WorkerConfig, model: LlamaForCausalLM, spec: KVCacheSpec,
                   device: torch.device, max_model_len: int) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type != "cuda":
        return cpu_num_blocks(spec, config.kv_cache_memory_gb)
    # Profile with a throwaway pool just big enough for one maximal sequence.
    seq_tokens = min(config.max_num_batched_tokens, max_model_len)
    scratch = allocate_kv_caches(spec, -(-seq_tokens // spec.block_size), device)
    profiler = ModelRunner(model, scratch, spec.block_size, device, max_model_len=max_model_len)
    num_blocks = cuda_num_blocks(
        spec, device, config.gpu_memory_utilization,
        lambda: profiler.profile_step(config.max_num_batched_tokens),
    )
    del profiler, scratch
    torch.cuda.empty_cache()
    return num_blocks


class Worker:
    """Serves one scheduler connection until `Shutdown`, a signal or a fatal device error."""

    def __init__(self, config: WorkerConfig, runner: ModelRunner,
                 hello: protocol.WorkerHello, keys: WorkerKeys | None = None) -> None:
        self.config = config
        self.runner = runner
        self.hello = hello
        self.keys = keys

    def serve(self, context: zmq.Context) -> int:
        """Connect, register, and answer plans; returns the process exit code."""
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=heartbeat_loop, name="heartbeat", daemon=True,
            args=(context, self.config, stop, self.keys),
        )
        socket = _dealer(context, self.config.identity, self.config.scheduler, self.keys)
        try:
            socket.send(protocol.encode(self.hello))
            heartbeat.start()
            return self._loop(socket)
        finally:
            stop.set()
            if heartbeat.is_alive():
                heartbeat.join(timeout=2.0)
            socket.close(linger=0)

    def _loop(self, socket: zmq.Socket) -> int:
        while True:
            # A DEALER receives the ROUTER's payload without the identity; tolerate an empty
            # delimiter frame in front of it.
            frame = socket.recv_multipart()[-1]
            try:
                message = protocol.decode_for_worker(frame)
            except Exception as exc:  # a malformed frame must not kill the worker
                logger.error("undecodable message from the scheduler: %s", exc)
                socket.send(protocol.encode(self._error(-1, exc)))
                continue
            if isinstance(message, protocol.Shutdown):
                logger.info("worker %d shutting down: %s", self.config.rank,
                            message.reason or "requested")
                return 0
            if isinstance(message, protocol.Reregister):
                if self.config.world_size > 1:
                    # Its group lost a member (or the scheduler restarted): a rank cannot rejoin
                    # alone, since its peers' collectives may be mid-step or gone.
                    logger.error("worker %d of %d exiting on a request to register again (%s): a "
                                 "tensor-parallel group is restarted whole", self.config.rank,
                                 self.config.world_size, message.reason)
                    return 1
                logger.warning("worker %d registering again (%s); dropping %d request(s)",
                               self.config.rank, message.reason, len(self.runner.requests))
                self.runner.reset()
                socket.send(protocol.encode(self.hello))
                continue
            reply, fatal = self._execute(message)
            socket.send(protocol.encode(reply))
            if fatal:
                return 1

    def _execute(self, plan: protocol.StepPlan) -> tuple[protocol.StepResult | protocol.WorkerError,
                                                          bool]:
        try:
            return self.runner.execute(plan), False
        except Exception as exc:
            logger.exception("step %d failed", plan.step_id)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # recoverable: hand the failed step's memory back
            # After a device-side fault the CUDA context is unusable: report, then exit non-zero
            # so the supervisor restarts the worker instead of failing every later step. A
            # tensor-parallel rank's peers may be waiting in a collective of this very step: the
            # group cannot go on in step, so it ends too.
            return self._error(plan.step_id, exc), _is_fatal(exc) or self.config.world_size > 1

    def _error(self, step_id: int, exc: Exception) -> protocol.WorkerError:
        return protocol.WorkerError(rank=self.config.rank, step_id=step_id,
                                    message=f"{type(exc).__name__}: {exc}")


def heartbeat_loop(context: zmq.Context, config: WorkerConfig, stop: threading.Event,
                   keys: WorkerKeys | None = None) -> None:
    """Send `Heartbeat` every interval from this thread's own socket until `stop` is set."""
    socket = _dealer(context, config.identity + b"-hb", config.scheduler, keys)
    beat = protocol.encode(protocol.Heartbeat(rank=config.rank, pid=os.getpid()))
    try:
        while not stop.is_set():
            try:
                # Never block: with the scheduler gone, beats past the HWM are simply dropped.
                socket.send(beat, zmq.NOBLOCK)
            except zmq.Again:
                pass
            if config.parent_pid is not None and os.getppid() != config.parent_pid:
                # Orphaned: the scheduler that spawned us died without a Shutdown.
                logger.error("worker %d: parent %d is gone; exiting", config.rank, config.parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            stop.wait(config.heartbeat_interval)
    finally:
        socket.close(linger=0)


def _dealer(context: zmq.Context, identity: bytes, address: str, keys: WorkerKeys | None) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        secure_worker_socket(socket, keys)
    socket.connect(address)
    return socket


def _is_fatal(exc: Exception) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (
        isinstance(exc, RuntimeError) and "CUDA error" in str(exc)
    )


class _Terminated(BaseException):
    """Raised from a signal handler to unwind the main thread promptly.

    A BaseException so that the step loop's `except Exception` cannot swallow it.
    """


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def run_worker(config: WorkerConfig) -> int:
    """Run a worker process to completion; returns its exit code (0 on Shutdown or a signal)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_terminated)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    # Keys first: a missing or unprotected key should not wait for the model to load.
    keys = None if config.worker_keys is None else load_worker_keys(Path(config.worker_keys), config.rank)
    context = zmq.Context()
    try:
        runner, hello = build_runner(config)
        return Worker(config, runner, hello, keys).serve(context)
    except _Terminated as exc:
        logger.info("worker %d stopped by %s", config.rank, exc)
        return 0
    finally:
        context.destroy(linger=0)
        leave_group()
