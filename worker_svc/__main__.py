"""`python -m worker_svc --scheduler tcp://HOST:PORT ...`: run one worker process."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from scheduler_svc.worker_link_security import WorkerLinkError
from worker_svc.backends import (
    ATTENTION_BACKENDS,
    ATTENTION_HELP,
    KV_CACHE_DTYPE_HELP,
    LINEAR_BACKENDS,
    LINEAR_HELP,
)
from worker_svc.model_store import DEFAULT_MODEL, LOAD_FORMATS
from worker_svc.parallel_config import DIST_BACKEND_HELP, DIST_BACKENDS, default_init_method, env_int, threads_per_rank
from worker_svc.worker import WorkerConfig, run_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker_svc", description=__doc__)
    parser.add_argument("--scheduler", required=True, help="scheduler ROUTER address")
    parser.add_argument("--rank", type=int, default=None,
                        help="tensor-parallel rank (default: $RANK, else 0)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="tensor-parallel size: ranks in the group (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--dist-init-method", default=None, metavar="URL",
                        help="torch.distributed rendezvous of the group, e.g. tcp://RANK0_HOST:29500 "
                             "(default: env:// when $MASTER_ADDR and $MASTER_PORT are set)")
    parser.add_argument("--dist-backend", default="auto", choices=list(DIST_BACKENDS), help=DIST_BACKEND_HELP)
    parser.add_argument("--dist-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="longest a collective waits for a peer before the rank gives up and exits "
                             "(default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="default model name, a .gguf file, or a model directory")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help=KV_CACHE_DTYPE_HELP)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV pool size in blocks (default: from the memory budget)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=2.0,
                        help="KV pool budget on CPU")
    parser.add_argument("--swap-space-gb", type=float, default=None,
                        help="host memory for swapped-out KV blocks (default: 4 with a GPU, 0 on CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory for weights, activations and KV pool")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="tokens in the CUDA memory-profiling step")
    parser.add_argument("--load-format", default="auto", choices=list(LOAD_FORMATS))
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch CPU threads (default: every usable core, shared among "
                             "$LOCAL_WORLD_SIZE ranks where a launcher sets it)")
    parser.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                        help=ATTENTION_HELP)
    parser.add_argument("--linear-backend", default="auto", choices=list(LINEAR_BACKENDS), help=LINEAR_HELP)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the spawning scheduler) is gone")
    parser.add_argument("--worker-keys", default=None, metavar="DIR",
                        help="CURVE keys from `omnibus keygen DIR` (this rank's key pair and the scheduler's "
                             "public key): authenticate and encrypt the link to a scheduler started with "
                             "--worker-keys")
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    """Parsed command line -> a checked `WorkerConfig`."""
    rank = env_int("RANK", 0) if args.rank is None else args.rank
    world_size = env_int("WORLD_SIZE", 1) if args.world_size is None else args.world_size
    num_threads = args.num_threads or threads_per_rank(len(os.sched_getaffinity(0)), env_int("LOCAL_WORLD_SIZE", 1))
    return WorkerConfig(
        scheduler=args.scheduler,
        rank=rank,
        world_size=world_size,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        swap_space_gb=args.swap_space_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_batched_tokens=args.max_num_batched_tokens,
        load_format=args.load_format,
        heartbeat_interval=args.heartbeat_interval,
        max_model_len=args.max_model_len,
        num_threads=num_threads,
        attention_backend=args.attention_backend,
        linear_backend=args.linear_backend,
        parent_pid=args.parent_pid,
        worker_keys=args.worker_keys,
        dist_init_method=args.dist_init_method or default_init_method(),
        dist_backend=args.dist_backend,
        dist_timeout_s=args.dist_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:  # a flag or launcher variable to fix: say which, no traceback
        parser.error(str(error))
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{config.rank} %(name)s: %(message)s",
    )
    try:
        return run_worker(config)
    except WorkerLinkError as error:  # a key to fix, not a crash to debug
        logging.getLogger("worker_svc").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
