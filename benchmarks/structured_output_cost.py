"""What structured outputs cost per decode step: 0, 8 and 32 JSON-schema requests in a batch of 32.

The engine's step without its sockets, in one process: the real scheduler plans each step, the
scheduler's matchers compute the constrained rows' token bitmasks (llguidance), the plan goes
through msgpack as it would over ZeroMQ, the real model runner masks the logits and samples, and
the sampled tokens advance the matchers. Every request decodes greedily with `ignore_eos`; the
constrained ones follow a schema (an array of at least 64 small objects) that they cannot finish
within the measured steps, so each step masks the same number of rows. Times are medians per
step over `--steps` decode steps, after `--warmup` steps, for each number of constrained rows;
the configurations run in turn `--rounds` times (the table: each column's median over rounds), so
a busy machine's drift spreads over all of them.

    python -m benchmarks.structured_output_cost --result-json bench_results/structured_output_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clients.bench.report import git_revision
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.request import Request, SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.structured_output import GrammarCompiler, Progress, StructuredOutputs
from scheduler_svc.tokenizer import ChatTurn, ModelTokenizer
from worker_svc.model_store import prepare_model
from worker_svc.token_mask import apply_token_masks
from worker_svc.worker import WorkerConfig, build_runner

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 64}
PROMPT = "List many people as JSON: name, age and tags of each."


@dataclass(slots=True)
class StepTimes:
    """Per-step times (ms) of one configuration, one entry per measured step."""

    mask_ms: list[float] = field(default_factory=list)  # scheduler: llguidance bitmasks
    wire_ms: list[float] = field(default_factory=list)  # msgpack encode + decode of the plan
    execute_ms: list[float] = field(default_factory=list)  # worker: forward, masking, sampling
    apply_ms: list[float] = field(default_factory=list)  # worker: the masking alone, on [batch, vocab] logits
    advance_ms: list[float] = field(default_factory=list)  # scheduler: matchers consume the tokens
    plan_bytes: list[int] = field(default_factory=list)

    def summary(self, num_constrained: int) -> dict:
        medians = {name: statistics.median(getattr(self, name)) for name in ("mask_ms", "wire_ms", "execute_ms", "advance_ms")}
        return {"constrained": num_constrained, **medians, "step_ms": sum(medians.values()),
                "apply_ms": statistics.median(self.apply_ms), "plan_bytes": int(statistics.median(self.plan_bytes))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--constrained", type=int, nargs="+", default=[0, 8, 32])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="times through --constrained; the table shows each column's median over rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU torch threads (default: torch's)")
    parser.add_argument("--result-json", type=Path, default=None)
    return parser.parse_args(argv)


def run_config(runner, tokenizer: ModelTokenizer, compiler: GrammarCompiler, args, num_constrained: int) -> StepTimes:
    """Decode a batch of `args.batch` requests, the first `num_constrained` of them constrained."""
    num_steps = args.warmup + args.steps
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=runner.num_blocks, max_model_len=4096,
                                          max_num_seqs=args.batch, max_num_batched_tokens=4096))
    outputs = StructuredOutputs()
    constraint = compiler.compile(pb.SamplingParams(json_schema=json.dumps(SCHEMA)))
    prompt = tokenizer.encode_chat([ChatTurn("user", PROMPT)])
    for i in range(args.batch):
        req_id = f"r{i}"
        # A distinct last prompt token per request, so no two rows are the same computation.
        scheduler.add_request(Request(req_id, prompt + [100 + i], SamplingParams(max_tokens=num_steps + 2, ignore_eos=True)))
        if i < num_constrained:
            outputs.add(req_id, constraint)
    runner.reset()
    times = StepTimes()
    for step in range(num_steps + 1):  # the first step is the prefill
        plan = scheduler.schedule()
        started = time.perf_counter()
        outputs.attach_masks(plan, scheduler.requests)
        masked = time.perf_counter()
        frame = protocol.encode(plan)
        plan = protocol.decode_for_worker(frame)
        wired = time.perf_counter()
        result = runner.execute(plan)
        executed = time.perf_counter()
        for update in scheduler.update_from_output(plan, result):
            if outputs.advance(update.req_id, update.new_token_ids) is not Progress.OPEN:
                raise RuntimeError(f"{update.req_id} left its constraint's open state; the schema should keep it open")
        advanced = time.perf_counter()
        apply_ms = _masking_ms(runner, runner.model.vocab_size, result.req_ids, plan.token_masks)
        if step > args.warmup:
            times.apply_ms.append(apply_ms)
            times.mask_ms.append((masked - started) * 1e3)
            times.wire_ms.append((wired - masked) * 1e3)
            times.execute_ms.append((executed - wired) * 1e3)
            times.advance_ms.append((advanced - executed) * 1e3)
            times.plan_bytes.append(len(frame))
    return times


def _masking_ms(runner, vocab_size: int, req_ids: list[str], token_masks: list[protocol.TokenMask]) -> float:
    """The worker's masking of one step on its own: the same op on logits of the step's shape."""
    logits = torch.randn(len(req_ids), vocab_size, device=runner.device)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    apply_token_masks(logits, req_ids, token_masks)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3


def _median_over_rounds(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir = prepare_model()
    runner, hello = build_runner(WorkerConfig(scheduler="inproc://unused", device=args.device, num_kv_blocks=1024))
    tokenizer = ModelTokenizer(model_dir)
    compiler = GrammarCompiler(tokenizer, hello.vocab_size)
    runs = [run_config(runner, tokenizer, compiler, args, k).summary(k)
            for _ in range(args.rounds) for k in args.constrained]
    rows = [_median_over_rounds([r for r in runs if r["constrained"] == k]) for k in args.constrained]
    header = (f"| constrained of {args.batch} | scheduler masks ms | plan msgpack ms | worker step ms "
              f"| of which masking ms | matcher advance ms | step ms | plan bytes |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['constrained']:.0f} | {r['mask_ms']:.2f} | {r['wire_ms']:.2f} | {r['execute_ms']:.1f} "
              f"| {r['apply_ms']:.2f} | {r['advance_ms']:.2f} | {r['step_ms']:.1f} | {r['plan_bytes']:.0f} |" for r in rows]
    print(f"device {hello.device}, dtype {hello.dtype}, torch threads {torch.get_num_threads()}")
    print("\n".join(lines))
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({
            "benchmark": "structured_output_cost", "date": datetime.date.today().isoformat(),
            "revision": git_revision(), "device": hello.device, "dtype": hello.dtype,
            "torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows, "runs": runs,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
