"""Scheduler overhead: the CPU cost of one engine step when the model costs nothing.

The real `Scheduler` and `WorkerGroup` drive a null worker process (benchmarks/null_worker.py) that
answers every plan at once over ZeroMQ. With N requests decoding (short prompts, ignore_eos, more
tokens than the run needs) each step is N one-token decodes; we time, per step, `schedule()`,
`WorkerGroup.execute()` (encode, send, the worker's turn, receive, decode) and
`update_from_output()`, then the msgpack encode/decode of that step's messages alone, and the
round trip of an empty plan (the ZeroMQ + asyncio floor). This is the time a GPU would sit idle
between steps if the engine did not overlap it.

    python -m benchmarks.scheduler_overhead --sizes 16 256 1024 --result-json overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from clients.bench.report import git_revision, machine_info, write_result
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.protocol import StepPlan, StepResult, WorkerHello
from scheduler_svc.request import Request, SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.worker_group import WorkerGroup

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16
EMPTY_PLAN_STEP_ID = 1 << 40  # far from any real step id, so results cannot be confused


@dataclass(slots=True)
class BenchConfig:
    """What one run measures."""

    sizes: list[int] = field(default_factory=lambda: [16, 256, 1024])  # running sequences
    steps: int = 200  # timed decode steps per repeat
    warmup: int = 20  # untimed decode steps after the prefill step
    repeats: int = 5
    prompt_len: int = 8
    rtt_iters: int = 1000  # empty-plan round trips
    tokenizer_dir: Path | None = None  # also time per-step detokenization with this tokenizer

    @property
    def max_tokens(self) -> int:
        # +1: the prefill step samples a token too; +1 more so nobody finishes inside the run.
        return self.warmup + self.repeats * self.steps + 2

    @property
    def num_kv_blocks(self) -> int:
        blocks_per_seq = -(-(self.prompt_len + self.max_tokens) // BLOCK_SIZE)
        return max(self.sizes) * blocks_per_seq


@dataclass(slots=True)
class StepTimes:
    """Per-step samples in microseconds: CPU of this thread (`*_cpu`) and wall clock."""

    schedule_cpu: list[float] = field(default_factory=list)
    execute_cpu: list[float] = field(default_factory=list)
    update_cpu: list[float] = field(default_factory=list)
    detokenize_cpu: list[float] = field(default_factory=list)
    execute_wall: list[float] = field(default_factory=list)
    step_wall: list[float] = field(default_factory=list)


def median_us(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def time_us(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of `fn` in microseconds."""
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def make_requests(config: BenchConfig, num_seqs: int) -> list[Request]:
    params = SamplingParams(max_tokens=config.max_tokens, ignore_eos=True)
    return [
        Request(f"n{num_seqs}-{i}", [(i + j) % 30_000 for j in range(config.prompt_len)], params)
        for i in range(num_seqs)
    ]


def make_scheduler(config: BenchConfig, hello: WorkerHello, num_seqs: int) -> Scheduler:
    return Scheduler(SchedulerConfig(
        num_kv_blocks=hello.num_kv_blocks,
        max_model_len=config.prompt_len + config.max_tokens,
        block_size=hello.block_size,
        max_num_seqs=num_seqs,
        max_num_batched_tokens=max(2048, num_seqs * config.prompt_len),  # prefill in one step
        max_queued_requests=num_seqs,
        watermark=0.0,
    ))


def make_detokenizers(config: BenchConfig, requests: list[Request]) -> dict | None:
    if config.tokenizer_dir is None:
        return None
    from scheduler_svc.detokenizer import IncrementalDetokenizer
    from scheduler_svc.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer(config.tokenizer_dir).tokenizer
    return {r.req_id: IncrementalDetokenizer(tokenizer, r.prompt_token_ids, []) for r in requests}


async def run_step(scheduler: Scheduler, workers: WorkerGroup, times: StepTimes | None,
                   detokenizers: dict | None) -> tuple[StepPlan, StepResult]:
    """One engine step: schedule, execute, update (and detokenize), timed when `times` is given."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    plan = scheduler.schedule()
    wall1, cpu1 = time.perf_counter(), time.thread_time()
    result = await workers.execute(plan)
    wall2, cpu2 = time.perf_counter(), time.thread_time()
    updates = scheduler.update_from_output(plan, result)
    cpu3 = time.thread_time()
    if detokenizers is not None:
        for update in updates:
            detokenizers[update.req_id].add_tokens(update.new_token_ids)
    wall4, cpu4 = time.perf_counter(), time.thread_time()
    if times is not None:
        times.schedule_cpu.append((cpu1 - cpu0) * 1e6)
        times.execute_cpu.append((cpu2 - cpu1) * 1e6)
        times.update_cpu.append((cpu3 - cpu2) * 1e6)
        if detokenizers is not None:
            times.detokenize_cpu.append((cpu4 - cpu3) * 1e6)
        times.execute_wall.append((wall2 - wall1) * 1e6)
        times.step_wall.append((wall4 - wall0) * 1e6)
    return plan, result


def codec_times(plan: StepPlan, result: StepResult) -> dict[str, float]:
    """Microseconds to encode and decode one decode step's plan and result, and their sizes."""
    plan_frame, result_frame = protocol.encode(plan), protocol.encode(result)
    iters = 200
    return {
        "plan_bytes": len(plan_frame),
        "plan_encode_us": time_us(lambda: protocol.encode(plan), iters),
        "plan_decode_us": time_us(lambda: protocol.decode_for_worker(plan_frame), iters),
        "result_encode_us": time_us(lambda: protocol.encode(result), iters),
        "result_decode_us": time_us(lambda: protocol.decode_for_scheduler(result_frame), iters),
    }


async def measure_size(config: BenchConfig, workers: WorkerGroup, num_seqs: int) -> dict:
    """Run `num_seqs` decoding requests; return the medians for this size."""
    scheduler = make_scheduler(config, workers.hellos[0], num_seqs)
    requests = make_requests(config, num_seqs)
    for request in requests:
        scheduler.add_request(request)
    detokenizers = make_detokenizers(config, requests)
    for _ in range(1 + config.warmup):
        await run_step(scheduler, workers, None, detokenizers)
    times, steps_per_s = StepTimes(), []
    for _ in range(config.repeats):
        start = time.perf_counter()
        for _ in range(config.steps):
            plan, result = await run_step(scheduler, workers, times, detokenizers)
            if plan.num_scheduled_tokens != num_seqs or len(result.req_ids) != num_seqs:
                raise RuntimeError(f"step {plan.step_id} is not {num_seqs} decodes")
        steps_per_s.append(config.steps / (time.perf_counter() - start))
    scheduler.abort_requests([r.req_id for r in requests])
    schedule_us, update_us = median_us(times.schedule_cpu), median_us(times.update_cpu)
    return {
        "num_seqs": num_seqs,
        "steps_per_s": statistics.median(steps_per_s),
        "scheduler_cpu_us": schedule_us + update_us,
        "schedule_cpu_us": schedule_us,
        "update_cpu_us": update_us,
        "execute_cpu_us": median_us(times.execute_cpu),
        "execute_wall_us": median_us(times.execute_wall),
        "detokenize_cpu_us": median_us(times.detokenize_cpu),
        "step_wall_us": median_us(times.step_wall),
        **codec_times(plan, result),
    }


async def measure_empty_rtt(workers: WorkerGroup, iters: int) -> float:
    """Median microseconds of `WorkerGroup.execute` on an empty plan."""
    samples = []
    for i in range(iters):
        plan = StepPlan(EMPTY_PLAN_STEP_ID + i, [], [], [])
        start = time.perf_counter()
        await workers.execute(plan)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def spawn_null_worker(endpoint: str, config: BenchConfig) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.null_worker", "--scheduler", endpoint,
               "--num-kv-blocks", str(config.num_kv_blocks), "--block-size", str(BLOCK_SIZE)]
    return subprocess.Popen(command, cwd=ROOT)


async def run(config: BenchConfig) -> dict:
    """Start a null worker, measure every size and the empty round trip, stop the worker."""
    # The null worker sends no heartbeats; its results are the only sign of life.
    workers = WorkerGroup("tcp://127.0.0.1:0", heartbeat_timeout_s=3600.0)
    await workers.start()
    process = spawn_null_worker(workers.endpoint, config)
    workers.watch_process(process)
    try:
        await workers.wait_registered(timeout_s=60.0)
        rtt_us = await measure_empty_rtt(workers, config.rtt_iters)
        sizes = [await measure_size(config, workers, n) for n in config.sizes]
        await workers.shutdown()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"empty_plan_rtt_us": rtt_us, "sizes": sizes}


def format_table(results: dict) -> str:
    columns = [
        ("num_seqs", "seqs", "{:d}"), ("steps_per_s", "steps/s", "{:.0f}"),
        ("scheduler_cpu_us", "sched+upd us", "{:.0f}"), ("schedule_cpu_us", "schedule us", "{:.0f}"),
        ("update_cpu_us", "update us", "{:.0f}"), ("execute_wall_us", "execute us", "{:.0f}"),
        ("plan_encode_us", "plan enc us", "{:.0f}"), ("result_decode_us", "res dec us", "{:.0f}"),
        ("detokenize_cpu_us", "detok us", "{:.0f}"), ("step_wall_us", "step us", "{:.0f}"),
    ]
    lines = [" ".join(f"{title:>12}" for _, title, _ in columns)]
    for row in results["sizes"]:
        cells = ["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append(" ".join(f"{cell:>12}" for cell in cells))
    lines.append(f"empty-plan round trip (WorkerGroup.execute): {results['empty_plan_rtt_us']:.0f} us")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--rtt-iters", type=int, default=1000)
    parser.add_argument("--tokenizer-dir", type=Path,
                        help="also time per-step detokenization with this model's tokenizer")
    parser.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    config = BenchConfig(args.sizes, args.steps, args.warmup, args.repeats, args.prompt_len,
                         args.rtt_iters, args.tokenizer_dir)
    return config, args.result_json


def main(argv: list[str] | None = None) -> int:
    config, result_json = parse_args(argv)
    results = asyncio.run(run(config))
    print(format_table(results))
    if result_json is not None:
        write_result(result_json, {
            "benchmark": "scheduler_overhead",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"sizes": config.sizes, "steps": config.steps, "warmup": config.warmup,
                       "repeats": config.repeats, "prompt_len": config.prompt_len,
                       "rtt_iters": config.rtt_iters,
                       "detokenize": config.tokenizer_dir is not None},
            "git": git_revision(),
            "machine": machine_info(None),
            **results,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
