"""The `omnibus` command: serve, scheduler, worker, keygen, generate, chat.

`serve` runs the scheduler in this process and spawns its worker; `scheduler` and `worker` run one
side alone (compose, multi-host). This module imports no torch: the worker is a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clients.bench.cli import add_bench_arguments, run_bench
from gateway_svc.cli import add_gateway_arguments, run_gateway
from worker_svc.backends import (
    ATTENTION_BACKENDS,
    ATTENTION_HELP,
    KV_CACHE_DTYPE_HELP,
    LINEAR_BACKENDS,
    LINEAR_HELP,
)
from worker_svc.parallel_config import DIST_BACKEND_HELP, DIST_BACKENDS, check_shardable, threads_per_rank

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the worker owns its flags (python -m worker_svc --help)
        os.execv(sys.executable, [sys.executable, "-m", "worker_svc", *argv[1:]])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnibus", description="Omnibus LLM serving engine")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the scheduler and its worker on this machine")
    _add_scheduler_flags(serve)
    _add_worker_flags(serve)
    serve.add_argument("--max-worker-restarts", type=int, default=3,
                       help="start a dead worker again at most N times within 10 minutes (requests resume "
                            "where they were); past that exit 1 (default: %(default)s)")
    serve.set_defaults(run=_run_serve)
    scheduler = commands.add_parser("scheduler", help="run the scheduler alone; workers connect to it")
    _add_scheduler_flags(scheduler)
    scheduler.add_argument("--worker-bind", default="tcp://0.0.0.0:5557", help="ZeroMQ endpoint workers connect to")
    scheduler.add_argument("--worker-keys", default=None, metavar="DIR",
                           help="CURVE keys from `omnibus keygen DIR`: encrypt the worker link and accept only "
                                "workers whose public key is in DIR/workers")
    scheduler.add_argument("--insecure-worker-link", action="store_true",
                           help="allow a --worker-bind other machines can reach without --worker-keys: anyone "
                                "who reaches it can register as a worker (logged as a warning)")
    scheduler.set_defaults(run=_run_scheduler)
    keygen = commands.add_parser("keygen", help="write CURVE key pairs for a scheduler and its workers")
    keygen.add_argument("dir", metavar="DIR", help="directory for the keys (created with mode 0700)")
    keygen.add_argument("--workers", type=int, default=1,
                        help="worker key pairs, for ranks 0..N-1 (default: %(default)s); existing pairs are kept")
    keygen.set_defaults(run=_run_keygen)
    commands.add_parser("worker", help="run one worker (flags: omnibus worker --help)")
    for name, chat in (("generate", False), ("chat", True)):
        client = commands.add_parser(name, help="stream a chat reply" if chat else "stream a completion")
        _add_client_flags(client)
        client.set_defaults(run=_run_generate, chat=chat)
    bench = commands.add_parser("bench", help="load generator: drive a running server, print and save metrics")
    add_bench_arguments(bench)
    bench.set_defaults(run=run_bench)
    gateway = commands.add_parser("gateway", help="serve an OpenAI-compatible HTTP API in front of a running server")
    add_gateway_arguments(gateway)
    gateway.set_defaults(run=run_gateway)
    return parser


def _add_scheduler_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default model name, a .gguf file, or a HF checkpoint directory")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="worker processes (ranks) the model is sharded over; serve starts them, a scheduler "
                             "waits for all N (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="most sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    parser.add_argument("--max-queued-requests", type=int, default=1024, help="waiting requests before RESOURCE_EXHAUSTED")
    parser.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="never reuse the KV blocks of an earlier request with the same prefix")
    parser.add_argument("--priority-aging-s", type=float, default=10.0,
                        help="seconds of waiting worth one priority level, so low priorities never starve (inf: strict)")
    parser.add_argument("--preemption-mode", default="auto", choices=["auto", "recompute", "swap"],
                        help="how to free KV blocks: auto picks per victim, swap needs the worker's --swap-space-gb")
    parser.add_argument("--scheduling", default="continuous", choices=["continuous", "static"],
                        help="static: admit a new batch only when the running one has finished (a baseline)")
    parser.add_argument("--scheduling-policy", default="priority", choices=["priority", "sjf", "fcfs"],
                        help="who runs next: priority (aged priority, then fair share between tenants, then "
                             "arrival; a waiting request that outranks running ones preempts the lowest when "
                             "slots or KV blocks are full), sjf (aged priority, then shortest remaining work, "
                             "aged; preempts like priority), fcfs (arrival only, priorities ignored)")
    parser.add_argument("--tenant-weights", default=None, metavar="FILE",
                        help="JSON object tenant -> weight (> 0) for fair share; unlisted tenants weigh 1, "
                             "\"\" is requests without a tenant")
    parser.add_argument("--priority-preemption-guard-steps", type=int, default=16,
                        help="a request preempted for priority runs this many steps after resuming before "
                             "priority may preempt it again (default: %(default)s)")
    parser.add_argument("--fair-share-half-life-steps", type=int, default=1000,
                        help="half-life, in scheduler steps, of the served-token counts fair share compares "
                             "(default: %(default)s)")
    parser.add_argument("--admission", default="immediate", choices=["immediate", "lifetime"],
                        help="immediate: admit a request when its next blocks fit; lifetime: only if its "
                             "forecast length (prompt + a quantile of observed output/max_tokens) fits beside "
                             "the running requests' forecasts, which avoids preemptions but measured lower "
                             "throughput (default: %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0, help="seconds without a worker heartbeat before it is declared dead")
    parser.add_argument("--worker-restart-timeout", type=float, default=120.0,
                        help="after losing its workers, keep requests (and queue new ones) this many seconds for "
                             "a worker to register again; then they fail with UNAVAILABLE (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port on --host (0: off)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="health turns NOT_SERVING after this many seconds without a step while requests are unfinished")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, seconds to let requests in flight finish before ending them")
    parser.add_argument("--drain-delay", type=float, default=0.0,
                        help="on SIGTERM/SIGINT, seconds to stay NOT_SERVING but still accept requests first, "
                             "so a load balancer's health check takes this replica out before it refuses any")
    parser.add_argument("--tls-cert", default=None, help="PEM server certificate (chain): serve gRPC over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates it signed (mTLS)")
    _add_request_limit_flags(parser)


def _add_request_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Bounds on one request, checked before any costly work (README: Errors over gRPC)."""
    from scheduler_svc.config import DEFAULT_MAX_REQUEST_BYTES, RequestLimits

    limits = RequestLimits()
    limit = parser.add_argument_group("request limits (over them: INVALID_ARGUMENT naming the field)")
    limit.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="largest gRPC request message; gRPC refuses larger ones with RESOURCE_EXHAUSTED "
                            "(default: %(default)s)")
    limit.add_argument("--max-input-chars", type=int, default=limits.max_input_chars,
                       help="characters of a prompt, of all chat messages together, or of a Tokenize input "
                            "(default: %(default)s)")
    limit.add_argument("--max-chat-messages", type=int, default=limits.max_chat_messages,
                       help="messages in one chat request (default: %(default)s)")
    limit.add_argument("--max-stop-strings", type=int, default=limits.max_stop_strings,
                       help="stop strings in one request (default: %(default)s)")
    limit.add_argument("--max-stop-string-chars", type=int, default=limits.max_stop_string_chars,
                       help="characters of one stop string (default: %(default)s)")
    limit.add_argument("--max-stop-token-ids", type=int, default=limits.max_stop_token_ids,
                       help="stop token ids in one request (default: %(default)s)")
    limit.add_argument("--max-abs-priority", type=int, default=limits.max_abs_priority,
                       help="clients may ask for priorities in [-N, N], so that aging bounds every wait "
                            "(default: %(default)s)")


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help=KV_CACHE_DTYPE_HELP)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from memory)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None, help="CPU: memory for the KV pool")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="CUDA: fraction of GPU memory to use")
    parser.add_argument("--swap-space-gb", type=float, default=None,
                        help="host memory for swapped-out KV blocks (default: 4 with a GPU, 0 on CPU)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="CPU worker: torch threads (default: every usable core; fewer on a shared machine)")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    parser.add_argument("--load-format", default="auto", choices=["auto", "random"], help="random: random weights for the config")
    parser.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS), help=ATTENTION_HELP)
    parser.add_argument("--linear-backend", default="auto", choices=list(LINEAR_BACKENDS), help=LINEAR_HELP)
    parser.add_argument("--dist-backend", default="auto", choices=list(DIST_BACKENDS), help=DIST_BACKEND_HELP)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text (chat: the user message)")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify the server with (turns TLS on)")
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate, for a server that requires one (mTLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    parser.add_argument("--request-id", default="", help="id carried into the server's logs (default: generated)")
    parser.add_argument("--system", default=None, help="chat: a system message")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def prepare_model_dir(spec: str) -> Path:
    """Resolve a model spec to a local directory, dequantizing a GGUF once (in a child process)."""
    if Path(spec).is_dir():
        return Path(spec)
    command = [sys.executable, "-m", "worker_svc.model_store", "prepare", "--model", spec]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(output.strip().splitlines()[-1])


def worker_commands(args: argparse.Namespace, endpoint: str, model_dir: Path) -> list[list[str]]:
    """The command lines of the `--tensor-parallel-size` ranks `serve` starts on this machine: on
    GPUs rank r takes `cuda:r`, on a CPU each its share of the cores (unless --num-threads)."""
    world_size = args.tensor_parallel_size
    if world_size == 1:
        return [worker_command(args, endpoint, model_dir)]
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"  # a fresh one each start: no stale peers
    threads = args.num_threads or threads_per_rank(len(os.sched_getaffinity(0)), world_size)
    return [worker_command(args, endpoint, model_dir, rank, world_size)
            + ["--dist-init-method", rendezvous, "--dist-backend", args.dist_backend, "--num-threads", str(threads)]
            for rank in range(world_size)]


def worker_command(args: argparse.Namespace, endpoint: str, model_dir: Path, rank: int = 0,
                   world_size: int = 1) -> list[str]:
    command = [sys.executable, "-m", "worker_svc", "--scheduler", endpoint, "--rank", str(rank),
               "--world-size", str(world_size), "--model", str(model_dir), "--device", args.device, "--dtype", args.dtype,
               "--kv-cache-dtype", args.kv_cache_dtype,
               "--block-size", str(args.block_size), "--load-format", args.load_format,
               "--attention-backend", args.attention_backend, "--linear-backend", args.linear_backend,
               "--parent-pid", str(os.getpid())]
    command += ["--log-level", args.log_level.upper()]
    flags = ["num_kv_blocks", "kv_cache_memory_gb", "gpu_memory_utilization", "max_model_len", "swap_space_gb"]
    for flag in flags + (["num_threads"] if world_size == 1 else []):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    return command


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_tensor_parallel_size(args: argparse.Namespace) -> None:
    if args.tensor_parallel_size < 1:
        raise SystemExit(f"omnibus: --tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")


def _check_model_divides(args: argparse.Namespace, model_dir: Path) -> None:
    """Refuse a --tensor-parallel-size the model's heads cannot be split by, before any rank starts."""
    import json
    from types import SimpleNamespace

    config_file = model_dir / "config.json"
    if args.tensor_parallel_size == 1 or not config_file.is_file():
        return
    try:
        check_shardable(SimpleNamespace(**json.loads(config_file.read_text())), args.tensor_parallel_size)
    except (ValueError, AttributeError) as error:
        raise SystemExit(f"omnibus: --tensor-parallel-size: {error}") from None


def _tls_config(args: argparse.Namespace):
    from scheduler_svc.tls import TlsConfig

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise SystemExit("omnibus: --tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SystemExit("omnibus: --tls-cert and --tls-key go together")
    try:
        return TlsConfig(Path(args.tls_cert), Path(args.tls_key), args.tls_client_ca and Path(args.tls_client_ca))
    except ValueError as error:
        raise SystemExit(f"omnibus: {error}") from None


def _serving_options(args: argparse.Namespace, model_dir: Path, **overrides):
    from scheduler_svc.app import ServingOptions

    if getattr(args, "max_worker_restarts", 0) < 0:
        raise SystemExit(f"omnibus: --max-worker-restarts must be >= 0, got {args.max_worker_restarts}")
    if not args.worker_restart_timeout > 0:
        raise SystemExit(f"omnibus: --worker-restart-timeout must be > 0, got {args.worker_restart_timeout}")
    return ServingOptions(
        model_dir=model_dir,
        model_id=Path(args.model).stem if args.model != DEFAULT_MODEL else DEFAULT_MODEL,
        host=args.host,
        port=args.port,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queued_requests=args.max_queued_requests,
        enable_chunked_prefill=not args.no_chunked_prefill,
        scheduling=args.scheduling,
        scheduling_policy=args.scheduling_policy,
        tenant_weights=_tenant_weights(args),
        priority_preemption_guard_steps=args.priority_preemption_guard_steps,
        fair_share_half_life_steps=args.fair_share_half_life_steps,
        admission=args.admission,
        enable_prefix_caching=not args.no_prefix_caching,
        priority_aging_s=args.priority_aging_s,
        preemption_mode=args.preemption_mode,
        heartbeat_timeout_s=args.heartbeat_timeout,
        worker_restart_timeout_s=args.worker_restart_timeout,
        max_worker_restarts=getattr(args, "max_worker_restarts", 0),  # a scheduler alone spawns none
        world_size=args.tensor_parallel_size,
        metrics_port=args.metrics_port or None,
        tls=_tls_config(args),
        stall_timeout_s=args.stall_timeout,
        drain_timeout_s=args.drain_timeout,
        drain_delay_s=args.drain_delay,
        max_request_bytes=args.max_request_bytes,
        request_limits=_request_limits(args),
        **overrides,
    )


def _tenant_weights(args: argparse.Namespace) -> dict[str, float]:
    from scheduler_svc.fair_share import load_tenant_weights

    if args.tenant_weights is None:
        return {}
    try:
        return load_tenant_weights(Path(args.tenant_weights))
    except ValueError as error:
        raise SystemExit(f"omnibus: --tenant-weights: {error}") from None


def _request_limits(args: argparse.Namespace):
    from scheduler_svc.config import RequestLimits

    if args.max_request_bytes < 1:
        raise SystemExit(f"omnibus: --max-request-bytes must be positive, got {args.max_request_bytes}")
    try:
        return RequestLimits(
            max_input_chars=args.max_input_chars, max_chat_messages=args.max_chat_messages,
            max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
            max_stop_token_ids=args.max_stop_token_ids, max_abs_priority=args.max_abs_priority,
        )
    except ValueError as error:
        raise SystemExit(f"omnibus: {error}") from None


def _run_serve(args: argparse.Namespace) -> int:
    from scheduler_svc.worker_link_security import private_worker_endpoint

    _tls_config(args)  # a flag mistake should fail before the model is prepared
    _check_tensor_parallel_size(args)
    model_dir = prepare_model_dir(args.model)
    _check_model_divides(args, model_dir)

    def spawn(endpoint: str) -> list[subprocess.Popen]:
        return [subprocess.Popen(command) for command in worker_commands(args, endpoint, model_dir)]

    # The worker is ours and local: an ipc socket only this user can open keeps others off the link.
    with private_worker_endpoint() as worker_bind:
        return asyncio.run(_serve_until_signal(_serving_options(args, model_dir, worker_bind=worker_bind), spawn))


def _run_scheduler(args: argparse.Namespace) -> int:
    _tls_config(args)
    _check_tensor_parallel_size(args)
    worker_keys = _worker_link(args)
    model_dir = prepare_model_dir(args.model)
    _check_model_divides(args, model_dir)
    options = _serving_options(args, model_dir, worker_bind=args.worker_bind, worker_keys=worker_keys,
                               insecure_worker_link=args.insecure_worker_link)
    return asyncio.run(_serve_until_signal(options, None))


def _worker_link(args: argparse.Namespace) -> Path | None:
    """Check the worker link's keys and bind before the model is prepared; the keys' directory."""
    from scheduler_svc.worker_link_security import WorkerLinkError, load_scheduler_keys, worker_bind_refusal

    worker_keys = None if args.worker_keys is None else Path(args.worker_keys)
    refusal = worker_bind_refusal(args.worker_bind, worker_keys is not None, args.insecure_worker_link)
    if refusal is not None:
        raise SystemExit(f"omnibus: {refusal}")
    try:
        if worker_keys is not None:
            load_scheduler_keys(worker_keys)
    except WorkerLinkError as error:
        raise SystemExit(f"omnibus: {error}") from None
    return worker_keys


def _run_keygen(args: argparse.Namespace) -> int:
    from scheduler_svc.worker_link_security import WorkerLinkError, generate_keys

    try:
        result = generate_keys(Path(args.dir), args.workers)
    except WorkerLinkError as error:
        raise SystemExit(f"omnibus: {error}") from None
    for path in result.written:
        print(f"wrote {path}")
    for path in result.kept:
        print(f"kept  {path}")
    print(f"scheduler: --worker-keys {args.dir}; a worker of rank r needs {args.dir}/scheduler.key and "
          f"{args.dir}/workers/worker-<r>.key_secret, in the same layout, then --worker-keys DIR")
    return 0


async def _serve_until_signal(options, spawn) -> int:
    """Serve until SIGTERM/SIGINT (drain, exit 0) or until the engine dies (exit 1: the worker died
    more often than --max-worker-restarts allows, or a bug; a supervisor restarts us and the
    workers rather than leave a replica NOT_SERVING forever)."""
    from scheduler_svc.app import ServingApp

    log = logging.getLogger("omnibus")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = ServingApp(options)
    starting = asyncio.create_task(app.start(spawn))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is not None:
        log.error("startup failed: %s", starting.exception())
        await app.stop()
        return 1
    starting.cancel()
    if app.engine is None:  # a signal before the workers registered
        log.info("stopping")
        await app.stop()
        return 0
    dying = asyncio.create_task(app.dead.wait())
    await asyncio.wait({stopping, dying}, return_when=asyncio.FIRST_COMPLETED)
    if app.dead.is_set():
        log.error("the engine is dead (%s); exiting", app.engine.dead_reason or app.workers.dead_reason)
        await app.stop()
        return 1
    dying.cancel()
    log.info("signal received: draining")
    await app.drain()  # bounded by options.drain_delay_s + drain_timeout_s
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    import grpc

    from clients.client import OmnibusClient, Sampling, build_request, tls_credentials

    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.chat:
        turns = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        request = build_request(messages=turns, sampling=sampling, request_id=args.request_id)
    else:
        request = build_request(args.prompt, sampling=sampling, request_id=args.request_id)
    use_tls = args.tls or args.tls_ca or args.tls_cert
    credentials = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if use_tls else None
    client = OmnibusClient(args.target, credentials=credentials)
    start, first, last = time.monotonic(), None, None
    try:
        for response in client.generate(request):
            first = first or time.monotonic()
            sys.stdout.write(response.text)
            sys.stdout.flush()
            last = response
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    _print_stats(start, first, last)
    return 0


def _print_stats(start: float, first: float | None, last) -> None:
    end = time.monotonic()
    if last is None:
        return
    tokens = last.usage.completion_tokens
    decode_s = end - (first or end)
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else float("nan")
    from omnibus.v1 import generation_pb2 as pb

    print(f"\n[{pb.FinishReason.Name(last.finish_reason)}] {last.usage.prompt_tokens} prompt + {tokens} "
          f"completion tokens; first token {first - start:.3f} s; {rate:.1f} tokens/s after it", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
