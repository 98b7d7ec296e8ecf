"""Benchmark the CUDA paged-attention kernels against torch SDPA on contiguous K/V.

    python -m kernels.bench                      # full sweep, table + bench_results/attention.json
    python -m kernels.bench --quick              # a few points, for a smoke run
    python -m kernels.bench --short --time-budget 90   # the largest points first, stop after 90 s

Decode sweeps batch x context x (heads, kv heads) x head_dim in bf16 with block size 16; prefill
runs the same grid up to --max-prefill-tokens tokens per batch. Each point is the median of --runs
CUDA-event timings with L2 flushed before every run. Bandwidth is reported against a device-to-
device copy measured in the same process (bytes read + bytes written). `--short` runs Llama-3-8B's
heads (32/8, head_dim 128) only, the points that move the most bytes (decode) or do the most work
(prefill) first, so a time-boxed run keeps the figures that matter; the JSON is rewritten after
every point, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.cuda_ops import CudaAttention

BATCHES = (1, 8, 64, 256)
CONTEXTS = (128, 1024, 4096, 16384)
HEADS = ((32, 8), (9, 3))
HEAD_DIMS = (64, 128)
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
SEED = 0


class Timer:
    """Median CUDA-event time of a callable, L2 flushed before each run."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(3):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # microseconds


def copy_bandwidth(timer: Timer) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6)


def paged_batch(batch: int, context: int, query_len: int, heads: tuple[int, int], head_dim: int):
    num_heads, num_kv_heads = heads
    pages = math.ceil(context / BLOCK_SIZE)
    shape = (batch * pages, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    tables = torch.randperm(batch * pages, device="cuda").to(torch.int32).view(batch, pages)
    q = torch.randn(batch * query_len, num_heads, head_dim, dtype=DTYPE, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, seq_lens, cu


def sdpa_fn(batch: int, context: int, query_len: int, heads: tuple[int, int], head_dim: int):
    """SDPA on contiguous [B, H, L, D] K/V (flash when it accepts the shapes), and the backend used."""
    num_heads, num_kv_heads = heads
    q = torch.randn(batch, num_heads, query_len, head_dim, dtype=DTYPE, device="cuda")
    k = torch.randn(batch, num_kv_heads, context, head_dim, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    causal = query_len > 1

    def plain():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=num_heads != num_kv_heads)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return plain()

    try:
        flash()
        return flash, "flash"
    except RuntimeError:
        return plain, "default"


def time_sdpa(timer, batch, context, query_len, heads, head_dim) -> tuple[float | None, str]:
    """SDPA's time, or None with the error when it cannot run the shape (memory, no backend)."""
    try:
        sdpa, backend = sdpa_fn(batch, context, query_len, heads, head_dim)
        return timer(sdpa), backend
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        torch.cuda.empty_cache()
        return None, f"failed: {str(exc).splitlines()[0][:120]}"


def bench_point(ops, timer, copy_bw, kind, batch, context, heads, head_dim) -> dict:
    torch.manual_seed(SEED)
    query_len = 1 if kind == "decode" else context
    q, k_cache, v_cache, tables, seq_lens, cu = paged_batch(batch, context, query_len, heads, head_dim)
    scale = head_dim ** -0.5
    hints = {"query_lens_cpu": [query_len] * batch, "seq_lens_cpu": [context] * batch}
    out = torch.empty_like(q)
    ours = timer(lambda: ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, cu, scale, out=out, **hints))
    del k_cache, v_cache
    theirs, backend = time_sdpa(timer, batch, context, query_len, heads, head_dim)
    num_heads, num_kv_heads = heads
    elem = torch.finfo(DTYPE).bits // 8
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * elem
    qo_bytes = 2 * q.numel() * elem
    flops = 4 * batch * num_heads * head_dim * (context if kind == "decode" else context * (context + 1) / 2)
    row = {
        "kind": kind, "batch": batch, "context": context, "heads": num_heads, "kv_heads": num_kv_heads,
        "head_dim": head_dim, "us": round(ours, 2), "sdpa_us": None if theirs is None else round(theirs, 2),
        "sdpa_backend": backend,
        "bytes": kv_bytes + qo_bytes, "gb_per_s": round((kv_bytes + qo_bytes) / ours * 1e-3, 1),
        "pct_copy_bw": round(100 * (kv_bytes + qo_bytes) / (ours * 1e-6) / copy_bw, 1),
        "tflops": round(flops / ours * 1e-6, 1), "vs_sdpa": None if theirs is None else round(ours / theirs, 3),
    }
    torch.cuda.empty_cache()
    return row


SHORT_DECODE = [(b, c) for b in (256, 64, 8, 1) for c in (16384, 4096, 1024) if b * c <= 1 << 20]
SHORT_PREFILL = [(2, 16384), (8, 4096), (1, 8192), (32, 1024), (1, 1024)]


def point_size(kind: str, batch: int, context: int) -> float:
    """What the point costs: K/V bytes for decode, attention FLOPs for prefill (for ordering only)."""
    return batch * context if kind == "decode" else batch * context * context


def sweep(args) -> list[tuple]:
    if args.short:
        points = [("decode", b, c, (32, 8), 128) for b, c in SHORT_DECODE if "decode" in args.kinds]
        points += [("prefill", b, c, (32, 8), 128) for b, c in SHORT_PREFILL
                   if "prefill" in args.kinds and b * c <= args.max_prefill_tokens]
        decode, prefill = ([p for p in points if p[0] == kind] for kind in ("decode", "prefill"))
        by_size = [sorted(group, key=lambda p: -point_size(*p[:3])) for group in (decode, prefill)]
        rank = {p: i for group in by_size for i, p in enumerate(group)}
        return sorted(points, key=lambda p: (rank[p], p[0] != "decode"))  # alternate kinds, largest first
    batches, contexts = (BATCHES, CONTEXTS) if not args.quick else ((1, 64), (1024, 4096))
    heads_list, dims = (HEADS, HEAD_DIMS) if not args.quick else (((32, 8),), (128,))
    points = []
    for kind in args.kinds:
        for heads in heads_list:
            for head_dim in dims:
                for batch in batches:
                    for context in contexts:
                        if kind == "prefill" and batch * context > args.max_prefill_tokens:
                            continue
                        points.append((kind, batch, context, heads, head_dim))
    return points


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a handful of points, for a smoke run")
    group.add_argument("--short", action="store_true", help="8B heads only, largest points first")
    parser.add_argument("--kinds", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    parser.add_argument("--max-prefill-tokens", type=int, default=32768)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new point after this much time (default: no limit)")
    parser.add_argument("--plan", action="store_true", help="print the points and write an empty result; no GPU")
    parser.add_argument("--out", type=Path, default=Path("bench_results/attention.json"))
    return parser.parse_args(argv)


def format_row(r: dict) -> str:
    sdpa = f"{r['sdpa_us']:>10.1f}{r['vs_sdpa']:>8.2f}" if r["sdpa_us"] is not None else f"{'-':>10}{'-':>8}"
    heads = f"{r['heads']}/{r['kv_heads']}"
    return (f"{r['kind']:<8}{r['batch']:>6}{r['context']:>7}{heads:>8}{r['head_dim']:>5}"
            f"{r['us']:>10.1f}{r['gb_per_s']:>8.0f}{r['pct_copy_bw']:>6.1f}{r['tflops']:>7.1f}" + sdpa)


HEADER = f"{'kind':<8}{'batch':>6}{'ctx':>7}{'heads':>8}{'D':>5}{'us':>10}{'GB/s':>8}{'%bw':>6}{'TF/s':>7}" \
         f"{'sdpa us':>10}{'x sdpa':>8}"


def write_json(path: Path, header: dict, rows: list[dict], skipped: list[tuple]) -> None:
    """The whole result so far (rewritten after every point, so a cut-short run keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = header | {"rows": rows, "skipped": [list(p) for p in skipped], "complete": not skipped}
    path.write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plan:
        points = sweep(args)
        for point in points:
            print(*point)
        write_json(args.out, {"device": None, "plan": True, "copy_bytes_per_s": 0}, [], points)
        print(f"{len(points)} points; wrote {args.out}")
        return
    started = time.monotonic()
    timer = Timer(args.runs)
    copy_bw = copy_bandwidth(timer)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    header = {"device": props.name, "num_sms": props.multi_processor_count, "copy_bytes_per_s": copy_bw,
              "dtype": str(DTYPE), "block_size": BLOCK_SIZE, "runs": args.runs, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    ops = CudaAttention()
    points, rows = sweep(args), []
    print(HEADER)
    for index, (kind, batch, context, heads, head_dim) in enumerate(points):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {len(points) - index} points skipped")
            write_json(args.out, header, rows, points[index:])
            break
        rows.append(bench_point(ops, timer, copy_bw, kind, batch, context, heads, head_dim))
        print(format_row(rows[-1]), flush=True)
        write_json(args.out, header, rows, points[index + 1:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
