"""Compile every kernel source with nvcc for sm_90: the CI check that needs no GPU.

    python -m kernels.build_check            # all .cu files, both configurations each
    python -m kernels.build_check decode.cu  # one file
    python -m kernels.build_check --cupy --jobs 16   # GPU machine: every configuration through CuPy

A file written for one configuration chosen by -D flags (see common.cuh) is compiled twice: with
its defaults and with the other dtype, head_dim, block size and the largest GQA group, so template
code paths that the defaults skip still reach the compiler. ptxas spills are reported, not failed.
`--cupy` instead compiles every configuration the wrappers can ask for the way they do (NVRTC
through CuPy, for the local GPU), in parallel processes: it proves each one compiles there and
leaves them in CuPy's on-disk cache, so later processes (the tests, a worker) load them at once.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
ALTERNATE = ("-DOMNIBUS_SCALAR=__half", "-DOMNIBUS_HEAD_DIM=64", "-DOMNIBUS_BLOCK_SIZE=8", "-DOMNIBUS_GROUP_MAX=16")


@dataclass(slots=True)
class CompileResult:
    source: str
    defines: tuple[str, ...]
    ok: bool
    seconds: float
    log: str

    @property
    def spills(self) -> list[str]:
        return [line.strip() for line in self.log.splitlines() if re.search(r"[1-9]\d* bytes spill", line)]


def sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def variants(source: Path) -> list[tuple[str, ...]]:
    """Define sets to compile `source` with: the defaults, plus ALTERNATE if the file is configurable."""
    return [(), ALTERNATE] if "OMNIBUS_HEAD_DIM" in source.read_text() else [()]


def nvcc_command(source: Path, output: Path, defines: tuple[str, ...] = ()) -> list[str]:
    return ["nvcc", "-arch=sm_90", "-std=c++17", "-c", f"-I{KERNEL_DIR}", "-Xptxas=-v", *defines, str(source),
            "-o", str(output)]


def compile_source(source: Path, defines: tuple[str, ...] = ()) -> CompileResult:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(nvcc_command(source, Path(tmp) / "out.o", defines), capture_output=True, text=True)
    return CompileResult(source.name, defines, run.returncode == 0, time.perf_counter() - start,
                         run.stdout + run.stderr)


def compile_with_cupy(jobs: int) -> int:
    """Every configuration of kernels.cuda_ops through CuPy, `jobs` processes at a time."""
    import importlib.util
    import multiprocessing

    if importlib.util.find_spec("cupy") is None:
        print("CuPy is not installed", file=sys.stderr)
        return 2
    from kernels import cuda_ops

    configs = cuda_ops.configurations()
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = pool.map(cuda_ops.compile_configuration, configs)
    for (source, defines), (ok, seconds, error) in zip(configs, results):
        if not ok:
            print(f"FAIL {source:<14} {' '.join(defines)} {seconds:5.1f}s\n{error}")
    failed = sum(not ok for ok, _, _ in results)
    print(f"cupy: {len(configs) - failed}/{len(configs)} configurations compiled in {time.perf_counter() - start:.1f}s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="kernel sources (default: every kernels/*.cu)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="print the full compiler log")
    parser.add_argument("--cupy", action="store_true", help="compile every configuration through CuPy (GPU machine)")
    args = parser.parse_args(argv)
    if args.cupy:
        return compile_with_cupy(args.jobs)
    if shutil.which("nvcc") is None:
        print("nvcc not found on PATH", file=sys.stderr)
        return 2
    paths = [KERNEL_DIR / Path(f).name for f in args.files] or sources()
    jobs = [(p, d) for p in paths for d in variants(p)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: compile_source(*job), jobs))
    for r in results:
        label = " ".join(d.removeprefix("-DOMNIBUS_") for d in r.defines) or "defaults"
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.source:<14} {label:<50} {r.seconds:5.1f}s")
        for spill in r.spills:
            print(f"     spill: {spill}")
        if args.verbose or not r.ok:
            print(r.log)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
