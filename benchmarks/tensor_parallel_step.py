"""The tensor-parallel decode step on one CPU host: step time and what its all-reduces cost.

For each world size N in `--world-sizes` it spawns N gloo ranks on this machine, each with
`max(1, cores // N)` torch threads. Every rank loads the model (float32, our CPU attention kernels),
shards it (`worker_svc.tensor_parallel`), packs its linears, and fills its own KV pool (its local KV
heads, random K/V) for `--context` tokens per sequence. Then, per batch, `dist.barrier()` before
each timed decode step, medians over `--repeats` after two warm-ups, timed on rank 0:

- `step`: the worker's decode step: forward over the paged cache, then, on rank 0, the LM head's
  logits and greedy sampling, and (N > 1) the broadcast of rank 0's tokens, as the worker does;
- the time spent inside the `all_reduce` calls of `RowParallelLinear` during that step (wrapped in
  these processes only), how many there were and how many bytes they reduced. It includes the wait
  for the slowest rank to arrive, not only the transfer;
- `standalone`: one all-reduce of the same `[batch, hidden]` float32 tensor, right after a barrier:
  the collective's own cost, without the skew between ranks.

A world size the model's heads do not divide by is reported, not run (the standalone all-reduce
still is). CPU/gloo only.

    python -m benchmarks.tensor_parallel_step --result-json bench_results/tensor_parallel_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig

import worker_svc.tensor_parallel as tensor_parallel
from benchmarks.cpu_step import BLOCK_SIZE, _cpu_model
from benchmarks.rank_processes import free_port, join_or_kill
from clients.bench.report import git_revision, json_safe, write_result
from scheduler_svc.protocol import SamplingOptions
from worker_svc.attention_metadata import AttentionMetadata
from worker_svc.cpu_fused_ops import use_fused_cpu_ops
from worker_svc.cpu_linear import pack_linears
from worker_svc.kv_cache import KVCacheSpec, KVCaches, allocate_kv_caches
from worker_svc.model_store import LOAD_FORMATS, load_model, prepare_model
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.parallel_config import ParallelConfig, check_shardable
from worker_svc.sampler import Sampler
from worker_svc.tensor_parallel import local_num_kv_heads, shard_model
from worker_svc.worker import attention_ops

WARMUPS = 2
SEED = 0


@dataclass(slots=True)
class RankJob:
    """What every rank of one world size runs; rank 0 writes its `BatchTiming`s to `out` as JSON."""

    world_size: int
    threads: int
    port: int
    model_dir: str
    load_format: str
    shard: bool  # False: the model does not divide by world_size; only the standalone all-reduce
    batches: list[int]
    context: int
    repeats: int
    micro_repeats: int
    timeout_s: float
    out: str


@dataclass(slots=True)
class BatchTiming:
    """Rank 0's medians for one batch size."""

    batch: int
    step_ms: float | None
    step_ms_range: tuple[float, float] | None  # fastest and slowest timed step: how noisy the host was
    all_reduce_ms: float | None  # inside RowParallelLinear's all_reduce, per step
    all_reduces_per_step: int | None
    all_reduce_bytes_per_step: int | None
    standalone_all_reduce_us: float


@dataclass(slots=True)
class Row:
    world_size: int
    threads_per_rank: int
    batch: int
    context: int
    step_ms: float | None
    step_ms_range: tuple[float, float] | None
    all_reduce_ms: float | None
    all_reduces_per_step: int | None
    all_reduce_bytes_per_step: int | None
    standalone_all_reduce_us: float
    speedup_vs_tp1: float | None = None
    skipped: str | None = None  # why the step was not run at this world size

    @property
    def all_reduce_share(self) -> float | None:
        return None if self.step_ms is None or self.all_reduce_ms is None else self.all_reduce_ms / self.step_ms

    @property
    def in_step_all_reduce_us(self) -> float | None:
        """Mean time of one all-reduce during the step (0 all-reduces: None)."""
        if not self.all_reduces_per_step:
            return None
        return self.all_reduce_ms * 1e3 / self.all_reduces_per_step


@dataclass(slots=True)
class AllReduceTimer:
    """Stands in for `torch.distributed` inside `worker_svc.tensor_parallel`: its `all_reduce` is
    timed and counted, everything else is torch's."""

    count: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def __getattr__(self, name: str):
        return getattr(dist, name)

    def all_reduce(self, tensor: torch.Tensor, *args, **kwargs):
        started = time.perf_counter()
        work = dist.all_reduce(tensor, *args, **kwargs)
        self.seconds += time.perf_counter() - started
        self.count += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return work

    def reset(self) -> None:
        self.count, self.seconds, self.bytes = 0, 0.0, 0


@contextlib.contextmanager
def timed_all_reduce() -> Iterator[AllReduceTimer]:
    """Route `RowParallelLinear`'s all-reduces (it calls `tensor_parallel.dist.all_reduce`) through
    a timer for the duration of the block."""
    timer = AllReduceTimer()
    tensor_parallel.dist = timer
    try:
        yield timer
    finally:
        tensor_parallel.dist = dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=300, help="tokens already in each sequence's cache")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--micro-repeats", type=int, default=200, help="standalone all-reduces per shape")
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                        help="random: weights drawn from a seed, the model directory needs only config.json")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per world size, and per collective")
    parser.add_argument("--result-json", type=Path, default=Path("bench_results/tensor_parallel_step.json"))
    return parser.parse_args(argv)


def build_rank_model(job: RankJob, parallel: ParallelConfig) -> LlamaForCausalLM:
    """Load, shard, then pack (packing replaces the plain `Linear`s that sharding leaves), and the
    elementwise kernels: as a worker builds its rank."""
    ops = attention_ops("auto", torch.device("cpu"))
    model = load_model(Path(job.model_dir), torch.device("cpu"), torch.float32, job.load_format, attn_ops=ops)
    shard_model(model, parallel)
    pack_linears(model)
    use_fused_cpu_ops(model)
    return model


def decode_inputs(model: LlamaForCausalLM, num_kv_heads: int, batch: int, context: int):
    """This rank's KV pool (random K/V in every slot) and one decode token per sequence. The seed is
    the same on every rank, so all ranks get the same block tables and tokens, as from a scheduler."""
    generator = torch.Generator().manual_seed(SEED + batch)
    seq_len = context + 1
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    spec = KVCacheSpec(model.num_layers, BLOCK_SIZE, num_kv_heads, model.head_dim, torch.float32)
    caches = allocate_kv_caches(spec, num_blocks, "cpu")
    for k_cache, v_cache in caches:
        k_cache.normal_(generator=generator)
        v_cache.normal_(generator=generator)
    ids = torch.randperm(num_blocks, generator=generator)[: batch * blocks_per_seq].view(batch, -1)
    attn = AttentionMetadata.build(ids.tolist(), [seq_len] * batch, [1] * batch, BLOCK_SIZE)
    input_ids = torch.randint(model.vocab_size, (batch,), generator=generator)
    positions = torch.full((batch,), context, dtype=torch.int64)
    return caches, attn, input_ids, positions


def decode_step(model: LlamaForCausalLM, parallel: ParallelConfig, caches: KVCaches, attn: AttentionMetadata,
                input_ids: torch.Tensor, positions: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The worker's tensor-parallel decode step: every rank runs the forward; rank 0 computes the
    logits and samples greedily, then broadcasts its tokens to the others."""
    sampler = Sampler("cpu")
    batch = len(attn.seq_lens_cpu)
    greedy, sample_positions = [SamplingOptions()] * batch, list(attn.seq_lens_cpu)

    def step() -> torch.Tensor:
        hidden = model(input_ids, positions, caches, attn)
        if parallel.rank == 0:
            tokens = sampler.sample(model.compute_logits(hidden), greedy, sample_positions)
        else:
            tokens = torch.empty(batch, dtype=torch.int64)
        if parallel.world_size > 1:
            dist.broadcast(tokens, src=0)
        return tokens

    return step


def time_steps(step: Callable[[], object], timer: AllReduceTimer,
               repeats: int) -> list[tuple[float, AllReduceTimer]]:
    """Every timed step's seconds (each after a barrier) with its all-reduce tally, fastest first."""
    tallies: list[tuple[float, AllReduceTimer]] = []
    for i in range(WARMUPS + repeats):
        dist.barrier()
        timer.reset()
        started = time.perf_counter()
        step()
        elapsed = time.perf_counter() - started
        if i >= WARMUPS:
            tallies.append((elapsed, AllReduceTimer(timer.count, timer.seconds, timer.bytes)))
    return sorted(tallies, key=lambda tally: tally[0])


def standalone_all_reduce_us(batch: int, hidden: int, repeats: int) -> float:
    """Median microseconds of one all-reduce of a `[batch, hidden]` float32 tensor, after a barrier."""
    tensor = torch.randn(batch, hidden)
    times = []
    for i in range(WARMUPS + repeats):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if i >= WARMUPS:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


@torch.inference_mode()
def measure_batch(job: RankJob, parallel: ParallelConfig, model: LlamaForCausalLM | None, hidden: int,
                  batch: int) -> BatchTiming:
    micro_us = standalone_all_reduce_us(batch, hidden, job.micro_repeats)
    if model is None:
        return BatchTiming(batch, None, None, None, None, None, micro_us)
    num_kv_heads = local_num_kv_heads(model.config, parallel.world_size)
    step = decode_step(model, parallel, *decode_inputs(model, num_kv_heads, batch, job.context))
    with timed_all_reduce() as timer:
        steps = time_steps(step, timer, job.repeats)
    seconds, tally = steps[len(steps) // 2]  # the median step (the upper one of an even count)
    return BatchTiming(batch, seconds * 1e3, (steps[0][0] * 1e3, steps[-1][0] * 1e3), tally.seconds * 1e3,
                       tally.count, tally.bytes, micro_us)


def run_rank(rank: int, job: RankJob) -> None:
    """One spawned rank: join the gloo group, build its shard, time every batch; rank 0 saves."""
    torch.set_num_threads(job.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job.port}", rank=rank,
                            world_size=job.world_size, timeout=timedelta(seconds=job.timeout_s))
    try:
        parallel = ParallelConfig(rank, job.world_size)
        model = build_rank_model(job, parallel) if job.shard else None
        hidden = AutoConfig.from_pretrained(job.model_dir).hidden_size
        timings = [measure_batch(job, parallel, model, hidden, batch) for batch in job.batches]
        if rank == 0:
            Path(job.out).write_text(json.dumps([asdict(t) for t in timings]))
        dist.barrier()  # no rank tears down (rank 0 hosts the rendezvous store) while a peer still needs it
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done, results saved: leave without tearing gloo down. On a loaded 2-core machine its teardown
    # at exit has aborted a finished rank now and then (SIGABRT, "terminate called without an active
    # exception"), failing a run whose every number was already written.
    os._exit(0)


def run_world(job: RankJob) -> list[BatchTiming]:
    """Spawn the job's ranks and wait; if one fails or the time is up, kill the others (they would
    wait forever in a collective) and raise."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_rank, args=(rank, job)) for rank in range(job.world_size)]
    for proc in procs:
        proc.start()
    join_or_kill(procs, job.timeout_s)
    codes = [proc.exitcode for proc in procs]
    if codes != [0] * job.world_size:
        raise RuntimeError(f"world size {job.world_size}: rank exit codes {codes} (tracebacks above)")
    return [BatchTiming(**t) for t in json.loads(Path(job.out).read_text())]


def shard_problem(model_dir: Path, world_size: int) -> str | None:
    """Why the model cannot be split over `world_size` ranks, or None."""
    try:
        check_shardable(AutoConfig.from_pretrained(model_dir), world_size)
    except ValueError as error:
        return str(error)
    return None


def measure(args: argparse.Namespace, model_dir: Path, cores: int, scratch: Path) -> list[Row]:
    rows: list[Row] = []
    for world_size in args.world_sizes:
        problem = shard_problem(model_dir, world_size)
        threads = max(1, cores // world_size)
        job = RankJob(world_size, threads, free_port(), str(model_dir), args.load_format, problem is None,
                      args.batches, args.context, args.repeats, args.micro_repeats, args.timeout_s,
                      str(scratch / f"tp{world_size}.json"))
        for t in run_world(job):
            rows.append(Row(world_size, threads, t.batch, args.context, t.step_ms, t.step_ms_range,
                            t.all_reduce_ms, t.all_reduces_per_step, t.all_reduce_bytes_per_step,
                            t.standalone_all_reduce_us, skipped=problem))
            print(format_row(rows[-1]), flush=True)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[Row]) -> None:
    """Speed-up of each row's step over world size 1's at the same batch."""
    baseline = {r.batch: r.step_ms for r in rows if r.world_size == 1 and r.step_ms}
    for row in rows:
        if row.step_ms and row.batch in baseline:
            row.speedup_vs_tp1 = baseline[row.batch] / row.step_ms


TABLE_HEADER = (
    "| TP | threads/rank | batch | step ms | all-reduce ms/step | % of step | all-reduces/step "
    "| µs per all-reduce in step | µs standalone all-reduce | speed-up vs TP=1 |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: Row) -> str:
    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    share = r.all_reduce_share
    return (f"| {r.world_size} | {r.threads_per_rank} | {r.batch} | {num(r.step_ms, '.1f')} "
            f"| {num(r.all_reduce_ms, '.2f')} | {'n/a' if share is None else f'{100 * share:.0f}%'} "
            f"| {num(r.all_reduces_per_step, 'd')} | {num(r.in_step_all_reduce_us, '.0f')} "
            f"| {r.standalone_all_reduce_us:.0f} | {num(r.speedup_vs_tp1, '.2f')} |")


def format_table(rows: list[Row]) -> str:
    lines = [TABLE_HEADER, *(format_row(r) for r in rows)]
    skipped = {r.world_size: r.skipped for r in rows if r.skipped}
    lines += [f"TP={n}: step not run: {why}" for n, why in skipped.items()]
    return "\n".join(lines)


def machine(cores: int) -> dict:
    return {"platform": platform.platform(), "processor": _cpu_model(), "cores": cores,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    model_dir = prepare_model(args.model, args.load_format)
    print(f"{model_dir} ({args.load_format}), context {args.context}, {cores} cores", flush=True)
    print(TABLE_HEADER, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        rows = measure(args, model_dir, cores, Path(scratch))
    print(format_table(rows))
    write_result(args.result_json, {
        "benchmark": "tensor_parallel_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": machine(cores),
        "model_dir": str(model_dir),
        "config": json_safe(vars(args)),
        "rows": [{**asdict(r), "all_reduce_share": r.all_reduce_share,
                  "in_step_all_reduce_us": r.in_step_all_reduce_us} for r in rows],
    })
    print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
