"""Soak: thousands of short requests, some cancelled, some past their deadline, against a scheduler
and its worker in their own processes. Passes when no request fails otherwise, the resident memory
of both processes stays flat after the warm-up, and the KV pool ends full (nothing running,
waiting or holding blocks).

    python -m benchmarks.soak --requests 2000 --concurrency 32 --result-json soak.json
    python -m benchmarks.soak --worker model --requests 500   # the real model on CPU (slower)

`--worker null` (the default) is benchmarks/null_worker.py: it computes nothing, so the soak
stresses the scheduler, the gRPC server and the link at full speed. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from clients.bench.report import git_revision, machine_info, write_result
from clients.cli import prepare_model_dir
from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc

WORDS = "the a of river stone light quick slow over under story time north city music data".split()


@dataclass(slots=True)
class Outcomes:
    completed: int = 0
    cancelled: int = 0
    deadline_exceeded: int = 0
    failed: list[str] = field(default_factory=list)  # anything else: a soak failure


@dataclass(slots=True, frozen=True)
class RssSample:
    requests_done: int
    scheduler_mib: float
    worker_mib: float


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(args: argparse.Namespace, model_dir: str, port: int, metrics_port: int):
    worker_port = free_port()
    endpoint = f"tcp://127.0.0.1:{worker_port}"
    scheduler = [sys.executable, "-m", "clients.cli", "--log-level", "warning", "scheduler", "--host", "127.0.0.1",
                 "--port", str(port), "--worker-bind", endpoint, "--model", model_dir,
                 "--metrics-port", str(metrics_port), "--max-queued-requests", str(args.requests),
                 # The null worker sends no heartbeats.
                 "--heartbeat-timeout", "3600" if args.worker == "null" else "15"]
    if args.worker == "null":
        worker = [sys.executable, "-m", "benchmarks.null_worker", "--scheduler", endpoint,
                  "--num-kv-blocks", str(args.num_kv_blocks)]
    else:
        worker = [sys.executable, "-m", "worker_svc", "--scheduler", endpoint, "--model", model_dir, "--device", "cpu",
                  "--num-kv-blocks", str(args.num_kv_blocks), "--num-threads", str(args.num_threads)]
    return subprocess.Popen(scheduler), subprocess.Popen(worker)


async def wait_serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service="omnibus.v1.Generation"), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not SERVING within {timeout_s:.0f} s")


async def one_request(stub, rng: random.Random, args: argparse.Namespace, outcomes: Outcomes) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24)))
    max_tokens = rng.randint(2, args.max_tokens)
    roll = rng.random()
    cancel_after = rng.randint(1, max_tokens) if roll < args.cancel_fraction else None
    deadline = rng.uniform(0.005, 0.2) if args.cancel_fraction <= roll < args.cancel_fraction + args.deadline_fraction \
        else 60.0
    request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    call = stub.Generate(request, timeout=deadline)
    received = 0
    try:
        async for response in call:
            received += len(response.token_ids)
            if cancel_after is not None and received >= cancel_after:
                call.cancel()
                outcomes.cancelled += 1
                return
        outcomes.completed += 1
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            outcomes.deadline_exceeded += 1
        elif error.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            outcomes.cancelled += 1
        else:
            outcomes.failed.append(f"{error.code().name}: {error.details()}")


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


def scrape(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


async def wait_pool_full(metrics_port: int, timeout_s: float) -> dict[str, float]:
    """The gauges once nothing runs, waits or holds a block (or as they are at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(metrics_port)
        idle = all(values.get(name, 1.0) == 0.0 for name in
                   ("omnibus_num_requests_running", "omnibus_num_requests_waiting", "omnibus_kv_cache_usage_ratio"))
        if idle or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace, scheduler: subprocess.Popen, worker: subprocess.Popen, port: int,
               metrics_port: int) -> tuple[Outcomes, list[RssSample], dict[str, float], float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, args.startup_timeout)
        stub = pb_grpc.GenerationStub(channel)
        outcomes, samples = Outcomes(), []
        slots = asyncio.Semaphore(args.concurrency)
        done = 0

        async def run(index: int) -> None:
            nonlocal done
            async with slots:
                await one_request(stub, random.Random(args.seed * 1_000_003 + index), args, outcomes)
            done += 1
            if done % max(args.requests // args.rss_samples, 1) == 0:
                samples.append(RssSample(done, rss_mib(scheduler.pid), rss_mib(worker.pid)))

        started = time.monotonic()
        await asyncio.gather(*(run(i) for i in range(args.requests)))
        elapsed = time.monotonic() - started
        gauges = await wait_pool_full(metrics_port, 10.0)
    return outcomes, samples, gauges, elapsed


def growth_mib(samples: list[RssSample], warmup_fraction: float, attr: str) -> float:
    """RSS at the end minus RSS once the warm-up is over (allocators and caches have filled)."""
    after_warmup = [s for s in samples if s.requests_done >= warmup_fraction * samples[-1].requests_done]
    return getattr(samples[-1], attr) - getattr(after_warmup[0], attr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16, help="each request asks for 2..N tokens")
    parser.add_argument("--cancel-fraction", type=float, default=0.15, help="requests the client cancels midway")
    parser.add_argument("--deadline-fraction", type=float, default=0.15,
                        help="requests with a deadline of 5-200 ms, which many outlive")
    parser.add_argument("--worker", choices=["null", "model"], default="null")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="the tokenizer (and with --worker model the weights): a name, .gguf or directory")
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--num-threads", type=int, default=1, help="--worker model: torch threads")
    parser.add_argument("--rss-samples", type=int, default=20)
    parser.add_argument("--warmup-fraction", type=float, default=0.25, help="RSS growth is measured after this")
    parser.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args(argv)
    if args.requests < args.rss_samples or not 0 <= args.cancel_fraction + args.deadline_fraction <= 1:
        parser.error("need --requests >= --rss-samples and cancel + deadline fractions within [0, 1]")

    model_dir = str(prepare_model_dir(args.model))
    port, metrics_port = free_port(), free_port()
    scheduler, worker = start_processes(args, model_dir, port, metrics_port)
    try:
        outcomes, samples, gauges, elapsed = asyncio.run(soak(args, scheduler, worker, port, metrics_port))
    finally:
        for process in (scheduler, worker):
            process.terminate()
        for process in (scheduler, worker):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    growth = {name: growth_mib(samples, args.warmup_fraction, f"{name}_mib") for name in ("scheduler", "worker")}
    checks = {
        "no request failed otherwise": not outcomes.failed,
        "pool full, nothing running or waiting": all(gauges.get(name, 1.0) == 0.0 for name in (
            "omnibus_num_requests_running", "omnibus_num_requests_waiting", "omnibus_kv_cache_usage_ratio")),
        f"scheduler RSS grew <= {args.max_rss_growth_mib:.0f} MiB": growth["scheduler"] <= args.max_rss_growth_mib,
        f"worker RSS grew <= {args.max_rss_growth_mib:.0f} MiB": growth["worker"] <= args.max_rss_growth_mib,
    }
    print(f"{args.requests} requests in {elapsed:.1f} s ({args.requests / elapsed:.0f}/s), concurrency "
          f"{args.concurrency}, worker {args.worker}: {outcomes.completed} completed, {outcomes.cancelled} cancelled, "
          f"{outcomes.deadline_exceeded} past their deadline, {len(outcomes.failed)} failed")
    print("requests  scheduler MiB  worker MiB")
    for sample in samples:
        print(f"{sample.requests_done:8d}  {sample.scheduler_mib:13.1f}  {sample.worker_mib:10.1f}")
    print(f"RSS growth after the warm-up: scheduler {growth['scheduler']:+.1f} MiB, worker {growth['worker']:+.1f} MiB")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    for failure in outcomes.failed[:10]:
        print(f"  failed: {failure}")
    if args.result_json is not None:
        write_result(args.result_json, {
            "benchmark": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": vars(args), "git": git_revision(), "machine": machine_info(None), "elapsed_s": elapsed,
            "outcomes": asdict(outcomes), "rss": [asdict(s) for s in samples], "rss_growth_mib": growth,
            "final_gauges": gauges, "checks": checks,
        })
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
