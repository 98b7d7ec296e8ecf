"""Baseline: Hugging Face transformers `generate` over padded static batches of a saved workload.

The workload is the JSON list that `omnibus bench --save-workload` writes, one object per request
with `prompt_token_ids` and `max_tokens` (other keys are ignored). Requests are cut, in arrival
order, into batches of `--batch-size`; each batch is left-padded (with an attention mask) and run
with greedy `generate` to its longest member's `max_tokens`, with eos ignored as the load
generator's requests ignore it. That is how a static padded batch behaves: every row computes
until the longest is done, and nobody gets an answer before the batch returns. Only each
request's own `max_tokens` count as output tokens; the rest is reported as padding waste.

Metrics are the load generator's (clients/bench/metrics.py), from per-request timestamps: every
request is sent at time 0 (the batches run back to back), its tokens are timed when `generate`
produced them (as if streamed), and it ends when its batch returns.

    python -m benchmarks.hf_baseline --workload-file W.json --batch-size 16 --result-json hf.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from clients.bench.metrics import RequestRecord, compute_metrics
from clients.bench.report import format_table, git_revision, machine_info, write_result
from clients.bench.workloads import BenchRequest, load_workload
from worker_svc.model_store import DEFAULT_MODEL, prepare_model
from worker_svc.worker import dtype_name, resolve_device, resolve_dtype


@dataclass(slots=True)
class BatchRun:
    """One batch's outputs (each cut to its request's max_tokens) and when its steps ended."""

    outputs: list[list[int]]
    step_times: list[float]  # perf_counter when each generated position existed
    end_time: float


class StepClock:
    """A `generate` streamer that only notes when each step's tokens exist."""

    def __init__(self) -> None:
        self.num_puts = 0
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts > 1:  # the first put is the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def resolve_model_dir(spec: str) -> Path:
    """A checkpoint directory as is (no tokenizer needed here), else the engine's model store."""
    path = Path(spec).expanduser()
    return path.resolve() if path.is_dir() else prepare_model(spec)


def load_hf_model(model_dir: Path, device: torch.device, dtype: torch.dtype, attn: str | None):
    """Transformers' own implementation of the checkpoint, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def left_pad(prompts: list[list[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_batch(model, batch: list[BenchRequest], device: torch.device) -> BatchRun:
    """Greedy `generate` of one padded batch to its longest member; each row cut to its own."""
    max_new_tokens = max(r.max_tokens for r in batch)
    input_ids, attention_mask = left_pad([r.prompt_token_ids for r in batch], 0, device)
    clock = StepClock()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
            max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0, streamer=clock,
        )
    new_tokens = output[:, input_ids.shape[1]:].tolist()  # .tolist() waits for the device
    end_time = time.perf_counter()
    if len(new_tokens[0]) != max_new_tokens or len(clock.times) != max_new_tokens:
        raise RuntimeError(f"generate returned {len(new_tokens[0])} tokens, not {max_new_tokens}")
    outputs = [row[: r.max_tokens] for row, r in zip(new_tokens, batch)]
    return BatchRun(outputs, clock.times, end_time)


def batch_records(batch: list[BenchRequest], first_index: int, run: BatchRun,
                  send_time: float) -> list[RequestRecord]:
    """The load generator's records of one batch: a token per step, the end when it returned."""
    return [
        RequestRecord(
            index=first_index + offset, prompt_len=len(request.prompt_token_ids),
            max_tokens=request.max_tokens, send_time=send_time,
            chunk_times=run.step_times[: request.max_tokens],
            chunk_tokens=[1] * request.max_tokens, end_time=run.end_time,
            output_tokens=len(output),
        )
        for offset, (request, output) in enumerate(zip(batch, run.outputs))
    ]


def run(model, requests: list[BenchRequest], batch_size: int,
        device: torch.device) -> tuple[list[RequestRecord], list[list[int]], float]:
    """Every batch back to back: the records, each request's output ids, the wall time."""
    records, outputs = [], []
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first: first + batch_size]
        batch_run = generate_batch(model, batch, device)
        records += batch_records(batch, first, batch_run, start)
        outputs += batch_run.outputs
    return records, outputs, time.perf_counter() - start


def padding_waste(requests: list[BenchRequest], batch_size: int) -> dict:
    """Tokens the padded batches generated beyond what their requests asked for."""
    generated = 0
    for first in range(0, len(requests), batch_size):
        batch = requests[first: first + batch_size]
        generated += len(batch) * max(r.max_tokens for r in batch)
    requested = sum(r.max_tokens for r in requests)
    return {"generated_tokens": generated, "requested_tokens": requested,
            "wasted_fraction": 1 - requested / generated}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload-file", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="default name, .gguf file or checkpoint directory (as omnibus serve)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--attn-implementation", default=None,
                        help="transformers attention (default: its own choice, sdpa)")
    parser.add_argument("--num-threads", type=int,
                        help="CPU torch threads (as the worker's --num-threads); default: torch's")
    parser.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    requests = load_workload(args.workload_file)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_dir = resolve_model_dir(args.model)
    model = load_hf_model(model_dir, device, dtype, args.attn_implementation)
    generate_batch(model, [BenchRequest(requests[0].prompt_token_ids, 2)], device)  # warm-up
    records, outputs, duration_s = run(model, requests, args.batch_size, device)
    metrics = compute_metrics(records, duration_s)
    waste = padding_waste(requests, args.batch_size)
    print(format_table(metrics, title=f"HF transformers, static batches of {args.batch_size}"))
    print(f"padding waste: {waste['wasted_fraction']:.1%} of {waste['generated_tokens']} "
          f"generated tokens")
    if args.result_json is not None:
        write_result(args.result_json, {
            "benchmark": "hf_baseline",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"workload_file": str(args.workload_file), "batch_size": args.batch_size,
                       "model": str(model_dir), "device": str(device), "dtype": dtype_name(dtype),
                       "attn_implementation": model.config._attn_implementation,
                       "num_threads": torch.get_num_threads()},
            "git": git_revision(),
            "machine": machine_info(None),
            "metrics": asdict(metrics),
            "padding": waste,
            "requests": [asdict(record) for record in records],
            "outputs": outputs,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
