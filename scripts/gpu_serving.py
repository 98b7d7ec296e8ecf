"""Serving on the GPU for the proof: the greedy-equivalence check and the 8B-shaped comparison.

`run_equivalence` serves the spine test's prompts (`tests/test_e2e_generation.py`) with `omnibus
serve --device cuda` once per variant (our CUDA attention, the torch reference in bf16, the torch
reference in fp32) and compares each greedy output with transformers' `generate` on the same GPU,
in the same dtype. A divergence passes only as a near-tie: our token among the reference's top-k
at that step and its logit within a tolerance of the reference's best (fp32: 1e-3, as in the
spine test; bf16: a few bf16 steps of the logit, since two correct bf16 implementations round
differently). The first divergence ends the comparison of that prompt, as in the spine test.

`run_serving` draws random bf16 weights for Llama-3-8B's shapes and serves a ShareGPT-like
workload with continuous and static batching, then runs transformers `generate` on it.
Both are driven by `scripts/gpu_proof.py` (the command line) from `scripts/gpu_proof.sh`.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# (dtype, abs, rel): a divergence is a near-tie when the logit gap <= abs + rel * |best logit|.
TIE_TOLERANCE = {"float32": (1e-3, 0.0), "bfloat16": (0.05, 2 ** -6)}
VARIANTS = {  # name: (attention backend, dtype)
    "cuda-bf16": ("cuda", "bfloat16"),
    "torch-bf16": ("torch", "bfloat16"),
    "torch-fp32": ("torch", "float32"),
}
# Llama-3-8B's shapes (the 8B-shaped serving comparison draws random weights for them).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5)
# A small random stand-in for the default model when its weights did not travel (SmolLM2's heads).
STAND_IN = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
                rms_norm_eps=1e-5)
STAND_IN_PROMPT_LENS = (31, 24, 27, 33, 262, 38, 384, 29)  # about the spine prompts' lengths


# -- synthetic models (stand-in and 8B-shaped) --------------------------------------------------


def write_synthetic_model(folder: Path, shape: dict, *, device: str, dtype: str, seed: int = 0,
                          initializer_range: float = 0.02) -> Path:
    """A Llama checkpoint with random weights (transformers' own init, seeded) and a word-level
    tokenizer with one token per id, so Omnibus and transformers load the very same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         initializer_range=initializer_range)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the final dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the servers started next size their KV pools from free memory
    write_word_tokenizer(folder, shape["vocab_size"])
    return folder


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<t1>", "eos_token": "<t2>"}))


# -- serving a model ----------------------------------------------------------------------------


@dataclass(slots=True)
class ServeOptions:
    model: str
    device: str = "cuda"
    attention_backend: str = "cuda"
    dtype: str = "bfloat16"
    port: int = 50095
    num_kv_blocks: int | None = 2048
    max_num_seqs: int = 64
    scheduling: str = "continuous"
    extra: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "clients.cli", "--log-level", "info", "serve", "--model", self.model,
                   "--device", self.device, "--attention-backend", self.attention_backend, "--dtype", self.dtype,
                   "--port", str(self.port), "--metrics-port", "0", "--max-num-seqs", str(self.max_num_seqs),
                   "--scheduling", self.scheduling]
        if self.num_kv_blocks is not None:
            command += ["--num-kv-blocks", str(self.num_kv_blocks)]
        return command + self.extra


@contextmanager
def served(options: ServeOptions, log: Path, timeout_s: float = 300) -> Iterator[str]:
    """`omnibus serve` running and SERVING for the duration; yields its target. Logs go to `log`."""
    from benchmarks.compare_batching import wait_serving

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        server = subprocess.Popen(options.command(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            target = f"127.0.0.1:{options.port}"
            wait_until_serving(server, target, timeout_s, wait_serving)
            yield target
        finally:
            stop_process(server)


def wait_until_serving(server: subprocess.Popen, target: str, timeout_s: float, wait_serving) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"omnibus serve exited with {server.returncode} before serving")
        try:
            wait_serving(target, min(5.0, deadline - time.monotonic()))
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{target} did not become SERVING in {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen, grace_s: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # the clean stop of Ctrl-C: drain, then the worker exits
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def generate_greedy(target: str, prompts: list[list[int]], max_tokens: int, timeout_s: float = 300) -> list[list[int]]:
    """Every prompt at once (so they batch), greedy, eos ignored; the generated token ids."""
    import grpc

    from omnibus.v1 import generation_pb2 as pb
    from omnibus.v1 import generation_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationStub(grpc.insecure_channel(target))

    def one(prompt: list[int]) -> list[int]:
        request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return [t for response in stub.Generate(request, timeout=timeout_s) for t in response.token_ids]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


# -- equivalence --------------------------------------------------------------------------------


@dataclass(slots=True)
class Reference:
    """transformers' greedy tokens of one prompt, with the top-k ids and logits of every step."""

    tokens: list[int]
    top_ids: list[list[int]]
    top_logits: list[list[float]]


def hf_reference(model_dir: Path, prompts: list[list[int]], dtype: str, device: str, max_new_tokens: int,
                 top_k: int = 5) -> list[Reference]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # as ignore_eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    references = []
    with torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([prompt], device=device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            top = torch.stack(out.logits)[:, 0].float().topk(top_k, dim=-1)
            references.append(Reference(out.sequences[0, len(prompt):].tolist(), top.indices.tolist(),
                                        top.values.tolist()))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return references


def compare(ours: list[int], ref: Reference, dtype: str) -> dict:
    """`match`, `near-tie` (first divergence within tolerance), `mismatch` or `length`."""
    tie_abs, tie_rel = TIE_TOLERANCE[dtype]
    for step, (got, want) in enumerate(zip(ours, ref.tokens)):
        if got == want:
            continue
        ids, logits = ref.top_ids[step], ref.top_logits[step]
        gap = logits[0] - logits[ids.index(got)] if got in ids else None
        allowed = tie_abs + tie_rel * abs(logits[0])
        status = "near-tie" if gap is not None and gap <= allowed else "mismatch"
        return {"status": status, "step": step, "ours": got, "reference": want, "gap": gap, "allowed": allowed,
                "reference_top": ids}
    if len(ours) != len(ref.tokens):
        return {"status": "length", "ours": len(ours), "reference": len(ref.tokens)}
    return {"status": "match"}


def spine_prompts(model_dir: Path) -> list[list[int]]:
    """The spine test's chat prompts, encoded with the model's tokenizer."""
    from scheduler_svc.tokenizer import ChatTurn, ModelTokenizer
    from tests.test_e2e_generation import QUESTIONS

    tokenizer = ModelTokenizer(model_dir)
    return [tokenizer.encode_chat([ChatTurn("user", q)]) for q in QUESTIONS]


def stand_in_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(1000, vocab_size, n).tolist() for n in STAND_IN_PROMPT_LENS]


def run_equivalence(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    model_dir, prompts, model_label = prepare_equivalence_model(args)
    references = {}
    for dtype in sorted({VARIANTS[v][1] for v in args.variants}):
        references[dtype] = hf_reference(model_dir, prompts, dtype, args.device, args.max_tokens)
    report = {"model": model_label, "model_dir": str(model_dir), "prompt_lens": [len(p) for p in prompts],
              "max_tokens": args.max_tokens, "tie_tolerance": TIE_TOLERANCE, "variants": {}}
    for variant in args.variants:
        if args.time_budget and time.monotonic() - started > args.time_budget:
            report["variants"][variant] = {"status": "skipped: time budget spent"}
            continue
        backend, dtype = VARIANTS[variant]
        options = ServeOptions(str(model_dir), device=args.device, attention_backend=backend, dtype=dtype,
                               port=args.port, num_kv_blocks=args.num_kv_blocks, extra=args.serve_args.split())
        report["variants"][variant] = equivalence_variant(options, prompts, references[dtype], args, variant)
        write_json(args.out, report)
    report["status"] = "passed" if all(v.get("status") == "passed" for v in report["variants"].values()) else "failed"
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out, report)
    return report


def prepare_equivalence_model(args: argparse.Namespace) -> tuple[Path, list[list[int]], str]:
    if args.stand_in:
        model_dir = write_synthetic_model(args.work / "stand-in", STAND_IN, device=args.device, dtype="float32")
        return model_dir, stand_in_prompts(STAND_IN["vocab_size"]), "random-weights stand-in (SmolLM2 heads, 8 layers)"
    from worker_svc.model_store import prepare_model

    model_dir = prepare_model(args.model)
    return model_dir, spine_prompts(model_dir), args.model or "default model"


def equivalence_variant(options: ServeOptions, prompts, references, args, variant: str) -> dict:
    began = time.monotonic()
    try:
        with served(options, args.work / f"serve-{variant}.log") as target:
            outputs = generate_greedy(target, prompts, args.max_tokens)
    except Exception as exc:  # a server that fails to start or serve is this variant's result
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.monotonic() - began, 1)}
    results = [compare(ours, ref, options.dtype) for ours, ref in zip(outputs, references)]
    counts = {s: sum(r["status"] == s for r in results) for s in ("match", "near-tie", "mismatch", "length")}
    ok = counts["mismatch"] == counts["length"] == 0
    return {"status": "passed" if ok else "failed", **counts, "prompts": results,
            "seconds": round(time.monotonic() - began, 1)}


# -- the 8B-shaped serving comparison -----------------------------------------------------------


def run_serving(args: argparse.Namespace) -> dict:
    """Random-weights Llama-3-8B shapes (bf16), a ShareGPT-like workload, all at once and at one
    rate, served continuously and `--scheduling static`, against transformers `generate`."""
    from clients.bench.workloads import save_workload, sharegpt_like_workload

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = dict(LLAMA3_8B) if args.shape == "llama3-8b" else dict(STAND_IN, num_hidden_layers=2)
    model_dir = write_synthetic_model(args.work / f"random-{args.shape}", shape, device=args.device, dtype=args.dtype)
    workload = args.out / "workload.json"
    save_workload(workload, sharegpt_like_workload(args.num_requests, seed=0, max_input=args.max_input,
                                                   max_output=args.max_output, vocab_size=shape["vocab_size"]))
    report = {"shape": args.shape, "model_config": shape, "dtype": args.dtype, "num_requests": args.num_requests,
              "rates": args.rates, "batch_size": args.batch_size, "attention_backend": args.attention_backend,
              "setup_seconds": round(time.monotonic() - started, 1), "runs": {}}
    for scheduling in ("continuous", "static"):
        options = ServeOptions(str(model_dir), device=args.device, attention_backend=args.attention_backend,
                               dtype=args.dtype, port=args.port, num_kv_blocks=args.num_kv_blocks,
                               max_num_seqs=args.batch_size, scheduling=scheduling, extra=args.serve_args.split())
        report["runs"].update(serve_and_bench(options, workload, args))
        write_json(args.out / "serving.json", report)
    report["runs"]["transformers"] = run_hf_baseline(model_dir, workload, args)
    report["ratios"] = serving_ratios(report["runs"])
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(args.out / "serving.json", report)
    return report


def serve_and_bench(options: ServeOptions, workload: Path, args) -> dict:
    runs = {}
    try:
        with served(options, args.out / f"serve-{options.scheduling}.log") as target:
            for rate in args.rates:
                label = f"{options.scheduling}-rate{rate}"
                result = args.out / f"{label}.json"
                subprocess.run([sys.executable, "-m", "clients.bench", "--target", target, "--workload-file",
                                str(workload), "--request-rate", str(rate), "--label", label, "--no-progress",
                                "--result-json", str(result)], check=True, timeout=args.run_timeout)
                runs[label] = headline(json.loads(result.read_text())["metrics"])
    except Exception as exc:
        runs[f"{options.scheduling}-error"] = {"error": f"{type(exc).__name__}: {exc}"}
    return runs


def run_hf_baseline(model_dir: Path, workload: Path, args) -> dict:
    result = args.out / "transformers.json"
    command = [sys.executable, "-m", "benchmarks.hf_baseline", "--workload-file", str(workload), "--batch-size",
               str(args.batch_size), "--model", str(model_dir), "--device", args.device, "--dtype", args.dtype,
               "--result-json", str(result)]
    try:
        subprocess.run(command, check=True, timeout=args.run_timeout)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return headline(json.loads(result.read_text())["metrics"])


def headline(metrics: dict) -> dict:
    """The figures the summary quotes from a load-generator (or baseline) result's metrics."""
    return {"output_tok_s": metrics["output_throughput"], "ttft_median_ms": metrics["ttft_ms"]["median"],
            "ttft_p99_ms": metrics["ttft_ms"]["p99"], "tpot_median_ms": metrics["tpot_ms"]["median"],
            "completed": metrics["completed"], "failed": metrics["failed"]}


def serving_ratios(runs: dict) -> dict:
    """Output throughput of continuous batching over static and over transformers, per rate."""
    ratios = {}
    hf = runs.get("transformers", {}).get("output_tok_s")
    for label, run in runs.items():
        if not label.startswith("continuous-rate") or "output_tok_s" not in run:
            continue
        rate = label.removeprefix("continuous-rate")
        static = runs.get(f"static-rate{rate}", {}).get("output_tok_s")
        if static:
            ratios[f"continuous/static at rate {rate}"] = round(run["output_tok_s"] / static, 3)
        if hf and rate == "inf":  # transformers gets every request at time 0 too
            ratios["continuous/transformers, all at once"] = round(run["output_tok_s"] / hf, 3)
    return ratios


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, default=str))
