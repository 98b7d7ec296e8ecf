"""How far continuous batching can beat static batching here: both policies simulated on one workload.

The served comparison (`benchmarks/compare_batching.py`) measures the two policies end to end. This
script asks what the ratio would be with no overhead at all: it replays the same workload through
an idealized copy of `scheduler_svc/scheduler.py`'s token-budget loop under `--scheduling static`
and `--scheduling continuous` (16 slots, every request queued at t=0, each generating exactly its
`max_tokens`, the KV pool large enough that nobody is preempted), and charges each step a cost
fitted on this machine:

    step_ms = intercept + per_row * decode_rows + per_context_token * context_tokens
              + per_prefill_token * prefill_tokens

where `context_tokens` sums the K/V length every sequence of the step attends over. The points
are in-process measurements of the real worker step (`benchmarks/cpu_step.py`'s model and decode
step, plus prefill chunks and one mixed step), or are loaded with `--cost-json`. The fit is then
made batch-flat (every step costs a full batch's decode, as on a GPU where a 16-row step costs
about what a 1-row one does) to show the ratio the same schedules give when a shrunken static tail
runs no cheaper steps. Beside the two policies, `bound` is the fastest any scheduler with the same
slots could be under each cost (`any_schedule_bound`): the ceiling of a better continuous policy.

    python -m benchmarks.batching_bound --result-json bench_results/batching_bound.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from benchmarks.cpu_step import BLOCK_SIZE, build, decode_inputs, decode_step, median_s
from clients.bench.report import git_revision, machine_info
from clients.bench.workloads import load_workload, sharegpt_like_workload
from scheduler_svc.protocol import SamplingOptions
from worker_svc.attention_metadata import AttentionMetadata, positions_for
from worker_svc.model_store import prepare_model
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.sampler import Sampler

POLICIES = ("static", "continuous")


@dataclass(slots=True)
class BatchingConfig:
    """The scheduler limits the served comparison runs with."""

    max_num_seqs: int = 16  # compare_batching --batch-size
    max_num_batched_tokens: int = 2048  # omnibus serve's default token budget
    enable_chunked_prefill: bool = True  # omnibus serve's default


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """What one request computes in one step."""

    index: int  # the request's place in the workload (its arrival order)
    num_computed_tokens: int  # before this step
    num_new_tokens: int
    is_decode: bool  # the token sampled in the previous step, not part of the prompt

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass(slots=True)
class _Progress:
    num_prompt_tokens: int
    max_tokens: int
    num_computed_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass(slots=True)
class CostPoint:
    """One measured step."""

    num_decode_rows: int
    num_context_tokens: int
    num_prefill_tokens: int
    step_ms: float


@dataclass(slots=True)
class CostModel:
    """Milliseconds of one step, linear in what the step computes."""

    intercept_ms: float
    per_row_ms: float  # per decode row: its share of every matrix product and of sampling
    per_context_token_ms: float  # per K/V token attention reads
    per_prefill_token_ms: float

    def step_ms(self, num_decode_rows: int, num_context_tokens: int, num_prefill_tokens: int) -> float:
        return (self.intercept_ms + self.per_row_ms * num_decode_rows
                + self.per_context_token_ms * num_context_tokens + self.per_prefill_token_ms * num_prefill_tokens)

    def chunks_ms(self, step: list[ScheduledChunk]) -> float:
        """The cost of one simulated step."""
        num_rows = sum(c.is_decode for c in step)
        num_prefill = sum(c.num_new_tokens for c in step if not c.is_decode)
        return self.step_ms(num_rows, sum(c.seq_len for c in step), num_prefill)

    def batch_flat(self, num_rows: int, context_per_row: float) -> CostModel:
        """The counterfactual: every step costs what a decode of `num_rows` rows at
        `context_per_row` costs, whatever the batch and its prefill tokens."""
        return CostModel(self.step_ms(num_rows, round(num_rows * context_per_row), 0), 0.0, 0.0, 0.0)


@dataclass(slots=True)
class SimResult:
    policy: str
    num_steps: int
    makespan_ms: float
    num_output_tokens: int
    num_scheduled_seqs: int  # summed over steps

    @property
    def output_tok_s(self) -> float:
        return self.num_output_tokens / self.makespan_ms * 1e3

    @property
    def mean_step_ms(self) -> float:
        return self.makespan_ms / self.num_steps

    @property
    def mean_batch(self) -> float:
        return self.num_scheduled_seqs / self.num_steps


def schedule_steps(lengths: list[tuple[int, int]], policy: str,
                   config: BatchingConfig) -> Iterator[list[ScheduledChunk]]:
    """The steps `Scheduler.schedule` plans for (prompt, output) `lengths`, all queued at once in
    that order: running requests first (a decode token or the next prompt chunk each), then
    admissions in queue order while budget and slots remain. `static` admits only the members of
    the current batch, the first `max_num_seqs` waiting once the previous batch has finished."""
    progress = [_Progress(p, o) for p, o in lengths]
    waiting, running, batch = deque(range(len(lengths))), [], set()
    while waiting or running:
        budget, step = config.max_num_batched_tokens, []
        for i in running:
            if budget <= 0:
                break
            budget -= _schedule(progress, i, budget, config, step)
        while budget > 0 and len(running) < config.max_num_seqs and waiting:
            if policy == "static" and not batch:
                batch = set(list(waiting)[: config.max_num_seqs])
            if policy == "static" and waiting[0] not in batch:
                break
            if _num_new_tokens(progress[waiting[0]], budget, config) == 0:
                break  # nobody overtakes the head of the queue
            running.append(waiting.popleft())  # FCFS: a later arrival sorts last
            budget -= _schedule(progress, running[-1], budget, config, step)
        yield step
        for chunk in step:
            if _advance(progress[chunk.index], chunk.num_new_tokens):
                running.remove(chunk.index)
                batch.discard(chunk.index)


def _num_new_tokens(request: _Progress, budget: int, config: BatchingConfig) -> int:
    """As `Scheduler._num_new_tokens`: the rest, or a budget-sized chunk of it (0: none)."""
    num_remaining = request.num_tokens - request.num_computed_tokens
    if num_remaining <= budget:
        return num_remaining
    return budget if config.enable_chunked_prefill else 0


def _schedule(progress: list[_Progress], i: int, budget: int, config: BatchingConfig,
              step: list[ScheduledChunk]) -> int:
    request = progress[i]
    n = _num_new_tokens(request, budget, config)
    if n:
        is_decode = request.num_computed_tokens >= request.num_prompt_tokens
        step.append(ScheduledChunk(i, request.num_computed_tokens, n, is_decode))
    return n


def _advance(request: _Progress, num_new_tokens: int) -> bool:
    """Apply a step's tokens and its sample; True when the request has finished."""
    request.num_computed_tokens += num_new_tokens
    if request.num_computed_tokens < request.num_tokens:
        return False  # a partial prefill chunk samples nothing
    request.num_output_tokens += 1
    return request.num_output_tokens >= request.max_tokens


def simulate(lengths: list[tuple[int, int]], policy: str, cost: CostModel, config: BatchingConfig) -> SimResult:
    """One policy's schedule of `lengths`, timed step by step with `cost`."""
    result = SimResult(policy, 0, 0.0, sum(o for _, o in lengths), 0)
    for step in schedule_steps(lengths, policy, config):
        result.num_steps += 1
        result.makespan_ms += cost.chunks_ms(step)
        result.num_scheduled_seqs += len(step)
    return result


def any_schedule_bound(lengths: list[tuple[int, int]], cost: CostModel, config: BatchingConfig) -> SimResult:
    """The fastest any schedule of `lengths` in `max_num_seqs` slots can be under a linear `cost`
    with non-negative terms. With nobody preempted the decode rows, K/V reads and prefill tokens
    are the same whatever the order (prefill counted unchunked), so only the number of steps can
    differ: each step samples at most `max_num_seqs` tokens, and one request one token."""
    num_outputs = sum(o for _, o in lengths)
    num_steps = max(-(-num_outputs // config.max_num_seqs), max(o for _, o in lengths))
    num_rows = num_outputs - len(lengths)
    num_context = sum(o * p + o * (o - 1) // 2 for p, o in lengths)  # prefill p, decode k reads p + k
    num_prefill = sum(p for p, _ in lengths)
    work_ms = cost.step_ms(num_rows, num_context, num_prefill) - cost.intercept_ms
    return SimResult("bound", num_steps, cost.intercept_ms * num_steps + work_ms, num_outputs, num_outputs)


def mean_decode_context(lengths: list[tuple[int, int]]) -> float:
    """K/V tokens a decode row attends over, averaged over every decode of the workload (the
    same whatever the policy: output k of a request always reads prompt + k tokens)."""
    num_rows = sum(o - 1 for _, o in lengths)
    num_tokens = sum((o - 1) * p + o * (o - 1) // 2 for p, o in lengths)
    return num_tokens / num_rows


def fit_cost(points: list[CostPoint]) -> CostModel:
    """Least squares of the relative errors over the measured steps: the points span 15-400 ms,
    and plain least squares lets the prefill steps set the intercept the many small decode steps
    of a static tail are charged (measured: 15% under at one row, against 5% this way)."""
    x = np.array([[1.0, p.num_decode_rows, p.num_context_tokens, p.num_prefill_tokens] for p in points])
    y = np.array([p.step_ms for p in points])
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError("the cost points cannot separate rows, context and prefill: vary each of them")
    return CostModel(*(float(c) for c in np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)[0]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--input-len", default="16:512", help="as compare_batching: only the upper bound is used")
    parser.add_argument("--output-len", default="16:1024", help="as compare_batching: only the upper bound is used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload-file", type=Path, default=None, help="a saved workload.json instead")
    parser.add_argument("--batch-size", type=int, default=16, help="max-num-seqs of both policies")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--step-overhead-ms", type=float, default=0.0,
                        help="added to every step (scheduler, IPC, input preparation), batch-flat")
    parser.add_argument("--cost-json", type=Path, default=None, help="reuse the points of an earlier --result-json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 768])
    parser.add_argument("--prefills", type=int, nargs="+", default=[64, 256, 512], help="one sequence's chunk")
    parser.add_argument("--mixed", nargs="*", default=["15x256+256"], help="ROWSxCONTEXT+PREFILL steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--result-json", type=Path, default=None)
    return parser.parse_args(argv)


def workload_lengths(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(prompt, output) lengths of compare_batching's `--workload sharegpt`, or of a saved file."""
    if args.workload_file:
        requests = load_workload(args.workload_file)
    else:
        requests = sharegpt_like_workload(args.num_requests, args.seed, max_input=int(args.input_len.split(":")[1]),
                                          max_output=int(args.output_len.split(":")[1]), vocab_size=49152)
    return [(len(r.prompt_token_ids), r.max_tokens) for r in requests]


def prefill_inputs(model: LlamaForCausalLM, num_prefill_tokens: int, num_decode_rows: int, context: int,
                   generator: torch.Generator):
    """A step that prefills one prompt's first `num_prefill_tokens` beside `num_decode_rows`
    decodes after `context` tokens, over a random KV pool (the batch prepare_inputs builds)."""
    seq_lens = [context + 1] * num_decode_rows + [num_prefill_tokens]
    query_lens = [1] * num_decode_rows + [num_prefill_tokens]
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    caches = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
              for _ in range(model.num_layers)]
    ids = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [ids[sum(blocks[:s]): sum(blocks[: s + 1])] for s in range(len(blocks))]
    attn = AttentionMetadata.build(tables, seq_lens, query_lens, BLOCK_SIZE)
    input_ids = torch.randint(model.vocab_size, (attn.num_tokens,), generator=generator)
    return caches, attn, input_ids, positions_for(seq_lens, query_lens)


def prefill_step(model: LlamaForCausalLM, caches, attn: AttentionMetadata, input_ids: torch.Tensor,
                 positions: torch.Tensor):
    """The worker's step: forward, then logits and greedy samples of each sequence's last row only."""
    sampler = Sampler("cpu")
    last_rows = (attn.cu_seqlens_q[1:] - 1).long()
    greedy = [SamplingOptions()] * attn.num_seqs

    def step() -> list[int]:
        hidden = model(input_ids, positions, caches, attn)
        return sampler.sample(model.compute_logits(hidden[last_rows]), greedy, list(attn.seq_lens_cpu)).tolist()

    return step


@torch.inference_mode()
def measure_points(args: argparse.Namespace) -> list[CostPoint]:
    """Median step times of decode batches, prefill chunks and mixed steps, in this process."""
    model, _, argmax = build(prepare_model(args.model), "auto", "auto")  # the CPU defaults
    generator = torch.Generator().manual_seed(0)
    points = []
    for batch in args.batches:
        for context in args.contexts:
            step = decode_step(model, *decode_inputs(model, batch, context, generator), argmax=argmax)
            points.append(CostPoint(batch, batch * (context + 1), 0, median_s(step, args.repeats) * 1e3))
            print(_point_line(points[-1]), flush=True)
    shapes = [(p, 0, 0) for p in args.prefills] + [_mixed_shape(text) for text in args.mixed]
    for num_prefill, num_rows, context in shapes:
        inputs = prefill_inputs(model, num_prefill, num_rows, context, generator)
        ms = median_s(prefill_step(model, *inputs), args.repeats) * 1e3
        points.append(CostPoint(num_rows, sum(inputs[1].seq_lens_cpu), num_prefill, ms))
        print(_point_line(points[-1]), flush=True)
    return points


def _mixed_shape(text: str) -> tuple[int, int, int]:
    """'ROWSxCONTEXT+PREFILL' as (prefill, rows, context)."""
    rows_context, prefill = text.split("+")
    rows, context = rows_context.split("x")
    return int(prefill), int(rows), int(context)


def _point_line(p: CostPoint) -> str:
    return (f"measured: rows {p.num_decode_rows} context tokens {p.num_context_tokens} "
            f"prefill {p.num_prefill_tokens}: {p.step_ms:.1f} ms")


def load_points(path: Path) -> list[CostPoint]:
    return [CostPoint(**p) for p in json.loads(path.read_text())["points"]]


def format_fit(points: list[CostPoint], cost: CostModel) -> str:
    lines = [f"fit: {cost.intercept_ms:.2f} ms + {cost.per_row_ms:.3f} ms/row "
             f"+ {cost.per_context_token_ms * 1e3:.3f} us/context token + {cost.per_prefill_token_ms:.3f} ms/prefill token",
             "| decode rows | context tokens | prefill tokens | measured ms | fitted ms | error |",
             "|---|---|---|---|---|---|"]
    for p in points:
        fitted = cost.step_ms(p.num_decode_rows, p.num_context_tokens, p.num_prefill_tokens)
        lines.append(f"| {p.num_decode_rows} | {p.num_context_tokens} | {p.num_prefill_tokens} | {p.step_ms:.1f} "
                     f"| {fitted:.1f} | {100 * (fitted / p.step_ms - 1):+.0f}% |")
    return "\n".join(lines)


def format_results(results: dict[str, dict[str, SimResult]]) -> str:
    lines = ["| step cost | policy | steps | makespan s | output tok/s | mean step ms | mean batch |",
             "|---|---|---|---|---|---|---|"]
    for name, by_policy in results.items():
        for r in by_policy.values():
            lines.append(f"| {name} | {r.policy} | {r.num_steps} | {r.makespan_ms / 1e3:.1f} | {r.output_tok_s:.1f} "
                         f"| {r.mean_step_ms:.1f} | {r.mean_batch:.2f} |")
    lines.append("")
    for name, by_policy in results.items():
        lines.append(f"{name} step cost: continuous / static {_ratio(by_policy, 'continuous'):.2f}x, "
                     f"bound / static {_ratio(by_policy, 'bound'):.2f}x")
    return "\n".join(lines)


def _ratio(by_policy: dict[str, SimResult], policy: str) -> float:
    return by_policy[policy].output_tok_s / by_policy["static"].output_tok_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    lengths = workload_lengths(args)
    points = load_points(args.cost_json) if args.cost_json else measure_points(args)
    fitted = fit_cost(points)
    print(format_fit(points, fitted))
    measured = CostModel(fitted.intercept_ms + args.step_overhead_ms, fitted.per_row_ms,
                         fitted.per_context_token_ms, fitted.per_prefill_token_ms)
    context_per_row = mean_decode_context(lengths)
    costs = {"measured": measured, "batch-flat": measured.batch_flat(args.batch_size, context_per_row)}
    config = BatchingConfig(args.batch_size, args.max_num_batched_tokens, not args.no_chunked_prefill)
    results = {name: {p: simulate(lengths, p, cost, config) for p in POLICIES}
               | {"bound": any_schedule_bound(lengths, cost, config)} for name, cost in costs.items()}
    print(f"workload: {len(lengths)} requests, {sum(p for p, _ in lengths)} prompt and {sum(o for _, o in lengths)} "
          f"output tokens; a decode row reads {context_per_row:.0f} K/V tokens on average")
    print(format_results(results))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({
            "benchmark": "batching_bound",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "git": git_revision(),
            "machine": machine_info(None) | {"threads": torch.get_num_threads(), "torch": torch.__version__},
            "config": {k: str(v) for k, v in vars(args).items()},
            "workload": {"lengths": lengths, "mean_decode_context": context_per_row},
            "points": [asdict(p) for p in points],
            "cost_models": {name: asdict(cost) for name, cost in costs.items()},
            "results": {name: {p: asdict(r) | {"output_tok_s": r.output_tok_s, "mean_step_ms": r.mean_step_ms,
                                                 "mean_batch": r.mean_batch} for p, r in by_policy.items()}
                        for name, by_policy in results.items()},
            "ratios": {name: {p: _ratio(by_policy, p) for p in ("continuous", "bound")}
                       for name, by_policy in results.items()},
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
