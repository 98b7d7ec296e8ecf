"""Benchmark the CUDA paged-attention kernels against torch SDPA on contiguous K/V.

    python -m kernels.bench                      # full sweep, table + bench_results/attention.json
    python -m kernels.bench --quick              # a few points, for a smoke run

Decode sweeps batch x context x (heads, kv heads) x head_dim in bf16 with block size 16; prefill
runs the same grid up to --max-prefill-tokens tokens per batch. Each point is the median of --runs
CUDA-event timings with L2 flushed before every run. Bandwidth is reported against a device-to-
device copy measured in the same process (bytes read + bytes written).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
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


def bench_point(ops, timer, copy_bw, kind, batch, context, heads, head_dim) -> dict:
    torch.manual_seed(SEED)
    query_len = 1 if kind == "decode" else context
    q, k_cache, v_cache, tables, seq_lens, cu = paged_batch(batch, context, query_len, heads, head_dim)
    scale = head_dim ** -0.5
    hints = {"query_lens_cpu": [query_len] * batch, "seq_lens_cpu": [context] * batch}
    out = torch.empty_like(q)
    ours = timer(lambda: ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, cu, scale, out=out, **hints))
    del k_cache, v_cache
    sdpa, backend = sdpa_fn(batch, context, query_len, heads, head_dim)
    theirs = timer(sdpa)
    num_heads, num_kv_heads = heads
    elem = torch.finfo(DTYPE).bits // 8
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * elem
    qo_bytes = 2 * q.numel() * elem
    flops = 4 * batch * num_heads * head_dim * (context if kind == "decode" else context * (context + 1) / 2)
    row = {
        "kind": kind, "batch": batch, "context": context, "heads": num_heads, "kv_heads": num_kv_heads,
        "head_dim": head_dim, "us": round(ours, 2), "sdpa_us": round(theirs, 2), "sdpa_backend": backend,
        "bytes": kv_bytes + qo_bytes, "gb_per_s": round((kv_bytes + qo_bytes) / ours * 1e-3, 1),
        "pct_copy_bw": round(100 * (kv_bytes + qo_bytes) / (ours * 1e-6) / copy_bw, 1),
        "tflops": round(flops / ours * 1e-6, 1), "vs_sdpa": round(ours / theirs, 3),
    }
    torch.cuda.empty_cache()
    return row


def sweep(args) -> list[tuple]:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kinds", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    parser.add_argument("--max-prefill-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path("bench_results/attention.json"))
    args = parser.parse_args(argv)

    timer = Timer(args.runs)
    copy_bw = copy_bandwidth(timer)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    ops = CudaAttention()
    rows = []
    header = f"{'kind':<8}{'batch':>6}{'ctx':>7}{'heads':>8}{'D':>5}{'us':>10}{'GB/s':>8}{'%bw':>6}{'TF/s':>7}" \
             f"{'sdpa us':>10}{'x sdpa':>8}"
    print(header)
    for kind, batch, context, heads, head_dim in sweep(args):
        r = bench_point(ops, timer, copy_bw, kind, batch, context, heads, head_dim)
        rows.append(r)
        print(f"{kind:<8}{batch:>6}{context:>7}{f'{heads[0]}/{heads[1]}':>8}{head_dim:>5}{r['us']:>10.1f}"
              f"{r['gb_per_s']:>8.0f}{r['pct_copy_bw']:>6.1f}{r['tflops']:>7.1f}{r['sdpa_us']:>10.1f}"
              f"{r['vs_sdpa']:>8.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": props.name, "num_sms": props.multi_processor_count, "copy_bytes_per_s": copy_bw,
              "dtype": str(DTYPE), "block_size": BLOCK_SIZE, "runs": args.runs, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
