"""The CPU decode step against its floors: matrix products, attention and memory bandwidth.

For each batch x context it times, in one process and one run, with the real default model:

- `step`: one decode step as the worker runs it (forward over the paged KV cache, logits of the
  sampled rows, greedy sampling) with the configuration's attention and linear backends;
- `gemm floor`: the model's matrix products alone (every layer's qkv, o, gate_up and down
  projections plus the LM head, on the same number of rows), through every linear backend; the
  floor is the fastest;
- `attention`: the attention calls alone (every layer, same metadata) with the configuration's
  kernel, and the time the K/V bytes they read take at the memory bandwidth measured in the run.

The three are timed in rounds, one call of each per round (step, every GEMM backend, attention),
so each round's step / floor ratio pairs measurements a fraction of a second apart; the VM's speed
drifts up to 1.5x over minutes. Step / floor is the median of the rounds' ratios.

Configurations: `before` (torch reference attention, `F.linear`), `after` (the defaults on a
CPU: our C++ attention and elementwise kernels, oneDNN prepacked linears and, at up to 12 rows,
the block kernel on the weights' own Q4_1/Q8_0 blocks), `after-onednn` (the same without the
block kernel), `after-f16kv` and `after-int8kv` (`after` over a float16 or int8 KV cache,
`--kv-cache-dtype float16|int8`).
Medians over `--repeats`.

    python -m benchmarks.cpu_step --result-json bench_results/cpu_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from clients.bench.report import git_revision
from kernels import int8_kv
from kernels.reference import AttentionOps
from worker_svc.attention_metadata import AttentionMetadata
from worker_svc.cpu_fused_ops import sampler_argmax, use_fused_cpu_ops
from worker_svc.cpu_block_linear import MAX_BLOCK_ROWS, BlockLinear
from worker_svc.cpu_linear import PackedLinear, prepare_linears
from worker_svc.model_store import load_model, prepare_model
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.sampler import Sampler, torch_argmax
from scheduler_svc.protocol import SamplingOptions
from worker_svc.worker import attention_ops

@dataclass(frozen=True, slots=True)
class StepConfig:
    attention: str  # --attention-backend
    linear: str  # --linear-backend
    kv_dtype: torch.dtype = torch.float32  # --kv-cache-dtype


CONFIGS = {
    "before": StepConfig("torch", "torch"),
    "after-onednn": StepConfig("auto", "onednn"),  # the defaults before the block weights
    "after": StepConfig("auto", "auto"),  # the defaults: oneDNN, and the block weights at <= 12 rows
    "after-f16kv": StepConfig("auto", "auto", torch.float16),  # opt-in: half the K/V bytes
    "after-int8kv": StepConfig("auto", "auto", torch.int8),  # opt-in: (head_dim + 4) / (4 head_dim)
}
BLOCK_SIZE = 16
Argmax = Callable[[torch.Tensor], torch.Tensor]  # the sampler's row argmax


@dataclass(slots=True)
class StepPoint:
    config: str
    batch: int
    context: int
    step_ms: float
    gemm_ms: dict[str, float]  # per linear backend
    gemm_floor_ms: float
    attention_ms: float
    kv_bytes: int
    attention_floor_ms: float  # kv_bytes at the measured bandwidth
    step_over_floor: float  # median over rounds of step / that round's fastest GEMM

    @property
    def attention_share(self) -> float:
        return self.attention_ms / self.step_ms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--extra", nargs="*", default=["32x300"], help="more BATCHxCONTEXT points")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--max-kv-gib", type=float, default=8.0, help="skip points whose KV pool is larger")
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--result-json", type=Path, default=None)
    return parser.parse_args(argv)


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each function per round, every function called once a round (after one
    warm-up round), so that slow and fast minutes of the machine hit them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - started) * 1e3)
    return times


def read_bandwidth_gbs(repeats: int) -> float:
    """Memory read bandwidth of this process's threads: summing a 1 GiB tensor."""
    data = torch.ones(1 << 28)
    seconds = median_s(data.sum, repeats)
    return data.numel() * data.element_size() / seconds / 1e9


def decode_inputs(model: LlamaForCausalLM, batch: int, context: int, generator: torch.Generator,
                  kv_dtype: torch.dtype = torch.float32):
    """A random KV pool (every slot filled) and one decode token per sequence after `context`."""
    seq_len = context + 1
    blocks_per_seq = -(-seq_len // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    caches = [(to_cache(torch.randn(shape, generator=generator), kv_dtype),
               to_cache(torch.randn(shape, generator=generator), kv_dtype))
              for _ in range(model.num_layers)]
    ids = torch.randperm(num_blocks, generator=generator)[: batch * blocks_per_seq].view(batch, -1)
    attn = AttentionMetadata.build(ids.tolist(), [seq_len] * batch, [1] * batch, BLOCK_SIZE)
    input_ids = torch.randint(model.vocab_size, (batch,), generator=generator)
    positions = torch.full((batch,), context, dtype=torch.int64)
    return caches, attn, input_ids, positions


def to_cache(rows: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    return int8_kv.quantize_rows(rows) if kv_dtype == torch.int8 else rows.to(kv_dtype)


def kv_bytes(model: LlamaForCausalLM, batch: int, context: int, kv_dtype: torch.dtype = torch.float32) -> int:
    row = int8_kv.row_width(model.head_dim, kv_dtype)
    per_token = 2 * model.num_kv_heads * row * kv_dtype.itemsize * model.num_layers
    return batch * (context + 1) * per_token


def linear_shapes(model: LlamaForCausalLM) -> list[tuple[int, int]]:
    """(in, out) of every matrix product of one step, LM head last."""
    attn, hidden, mlp = model.model.layers[0].self_attn, model.config.hidden_size, model.model.layers[0].mlp
    per_layer = [
        (hidden, attn.q_size + 2 * attn.kv_size),  # qkv
        (attn.q_size, hidden),  # o
        (hidden, 2 * mlp.intermediate_size),  # gate_up
        (mlp.intermediate_size, hidden),  # down
    ]
    return per_layer * model.num_layers + [(model.config.hidden_size, model.vocab_size)]


def gemm_calls(model: LlamaForCausalLM, rows: int, generator: torch.Generator) -> dict[str, Callable[[], object]]:
    """The step's matrix products on `rows` rows, one call per linear backend: `torch` and `onednn`
    on random weights of the model's shapes, `blocks` (where the model has them, at up to
    MAX_BLOCK_ROWS rows) on the model's own Q4_1/Q8_0 blocks."""
    shapes = linear_shapes(model)
    weights = [torch.randn(n, k, generator=generator) * 0.02 for k, n in shapes]
    inputs = {k: torch.randn(rows, k, generator=generator) for k, _ in set(shapes)}
    packed = [PackedLinear(w, None) for w in weights]
    calls = {
        "torch": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
        "onednn": lambda: [p(inputs[p.in_features]) for p in packed],
    }
    blocks = model_block_linears(model)
    if rows <= MAX_BLOCK_ROWS and len(blocks) == len(shapes):
        calls["blocks"] = lambda: [b(inputs[b.in_features]) for b in blocks]
    return calls


def model_block_linears(model: LlamaForCausalLM) -> list[BlockLinear]:
    """The model's `BlockLinear`s in step order (layers' qkv, o, gate_up, down, then the LM head)."""
    modules = []
    for layer in model.model.layers:
        modules += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    return [m for m in modules + [model.lm_head] if isinstance(m, BlockLinear)]


def build(model_dir: Path, attention: str, linear: str) -> tuple[LlamaForCausalLM, AttentionOps, Argmax]:
    """The model as a worker with these backends builds it (worker_svc/worker.py), with its
    sampler's row argmax."""
    ops = attention_ops(attention, torch.device("cpu"))
    model = load_model(model_dir, torch.device("cpu"), torch.float32, attn_ops=ops)
    prepare_linears(model, linear)
    isa = use_fused_cpu_ops(model) if attention != "torch" else None
    return model, ops, sampler_argmax(isa)


def decode_step(model: LlamaForCausalLM, caches, attn: AttentionMetadata, input_ids: torch.Tensor,
                positions: torch.Tensor, argmax: Argmax = torch_argmax) -> Callable[[], list[int]]:
    """One decode step as the worker runs it: forward, logits of every row, greedy sampling."""
    sampler = Sampler("cpu", argmax=argmax)
    greedy = [SamplingOptions()] * len(attn.seq_lens_cpu)
    sample_positions = list(attn.seq_lens_cpu)

    def step() -> list[int]:
        hidden = model(input_ids, positions, caches, attn)
        return sampler.sample(model.compute_logits(hidden), greedy, sample_positions).tolist()

    return step


@torch.inference_mode()
def step_ms(model: LlamaForCausalLM, batch: int, context: int, repeats: int, argmax: Argmax = torch_argmax) -> float:
    """Median milliseconds of one decode step of `batch` sequences after `context` tokens."""
    inputs = decode_inputs(model, batch, context, torch.Generator().manual_seed(batch * 100_003 + context))
    return median_s(decode_step(model, *inputs, argmax=argmax), repeats) * 1e3


@torch.inference_mode()
def measure_point(config: str, model: LlamaForCausalLM, ops: AttentionOps, argmax: Argmax, batch: int, context: int,
                  gemm: dict[str, Callable[[], object]], bandwidth_gbs: float, repeats: int) -> StepPoint:
    generator = torch.Generator().manual_seed(batch * 100_003 + context)
    kv_dtype = CONFIGS[config].kv_dtype
    caches, attn, input_ids, positions = decode_inputs(model, batch, context, generator, kv_dtype)
    step = decode_step(model, caches, attn, input_ids, positions, argmax)
    q = torch.randn(batch, model.num_heads, model.head_dim, generator=generator)
    scale = model.head_dim**-0.5

    def attention():
        for k_cache, v_cache in caches:
            ops.paged_attention(q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.cu_seqlens_q, scale,
                                query_lens_cpu=attn.query_lens_cpu, seq_lens_cpu=attn.seq_lens_cpu)

    num_bytes = kv_bytes(model, batch, context, kv_dtype)
    times = interleaved_ms({"step": step, "attention": attention, **{f"gemm {n}": f for n, f in gemm.items()}}, repeats)
    gemm_ms = {name: times[f"gemm {name}"] for name in gemm}
    floors = [min(per_round) for per_round in zip(*gemm_ms.values())]
    return StepPoint(
        config=config, batch=batch, context=context,
        step_ms=statistics.median(times["step"]),
        gemm_ms={name: statistics.median(t) for name, t in gemm_ms.items()},
        gemm_floor_ms=statistics.median(floors),
        attention_ms=statistics.median(times["attention"]),
        kv_bytes=num_bytes,
        attention_floor_ms=num_bytes / (bandwidth_gbs * 1e9) * 1e3,
        step_over_floor=statistics.median(s / f for s, f in zip(times["step"], floors)),
    )


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    grid = [(b, c) for b in args.batches for c in args.contexts]
    for text in args.extra:
        b, c = text.split("x")
        grid.append((int(b), int(c)))
    return grid


def format_table(results: list[StepPoint], bandwidth_gbs: float, weight_bytes: int) -> str:
    lines = [
        f"read bandwidth {bandwidth_gbs:.1f} GB/s; weights streamed per step {weight_bytes / 1e6:.0f} MB",
        "| config | batch | context | step ms | F.linear ms | oneDNN ms | blocks ms | GEMM floor ms | step / floor "
        "| attention ms | attention % of step | attention bandwidth floor ms | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.batch} | {r.context} | {r.step_ms:.1f} | {r.gemm_ms['torch']:.1f} "
            f"| {r.gemm_ms['onednn']:.1f} | {_ms(r.gemm_ms.get('blocks'))} | {r.gemm_floor_ms:.1f} "
            f"| {r.step_over_floor:.2f}x "
            f"| {r.attention_ms:.1f} | {100 * r.attention_share:.0f}% | {r.attention_floor_ms:.1f} "
            f"| {r.batch / r.step_ms * 1e3:.1f} |"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model_dir = prepare_model(args.model)
    bandwidth = read_bandwidth_gbs(args.repeats)
    grid = [(b, c) for b, c in points(args)]
    results: list[StepPoint] = []
    generator = torch.Generator().manual_seed(0)
    gemm_cache: dict[int, dict[str, Callable[[], object]]] = {}  # one batch's weights at a time
    weight_bytes = 0
    for config in args.configs:
        model, ops, argmax = build(model_dir, CONFIGS[config].attention, CONFIGS[config].linear)
        weight_bytes = sum(k * n * 4 for k, n in linear_shapes(model))
        for batch, context in grid:
            pool_gib = kv_bytes(model, batch, context, CONFIGS[config].kv_dtype) / (1 << 30)
            if pool_gib > args.max_kv_gib:
                print(f"skip batch {batch} context {context}: KV pool {pool_gib:.1f} GiB > --max-kv-gib")
                continue
            if batch not in gemm_cache:
                gemm_cache = {batch: gemm_calls(model, batch, generator)}
            point = measure_point(config, model, ops, argmax, batch, context, gemm_cache[batch], bandwidth,
                                  args.repeats)
            results.append(point)
            print(format_table([point], bandwidth, weight_bytes).splitlines()[-1], flush=True)
        del model, ops, argmax
    table = format_table(results, bandwidth, weight_bytes)
    print(table)
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({
            "benchmark": "cpu_step",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "git": git_revision(),
            "machine": {"platform": platform.platform(), "processor": _cpu_model(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "read_bandwidth_gbs": bandwidth,
            "weight_bytes": weight_bytes,
            "config": {k: str(v) for k, v in vars(args).items()},
            "points": [{**asdict(r), "attention_share": r.attention_share}
                       for r in results],
        }, indent=1) + "\n")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
