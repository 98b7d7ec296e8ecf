"""The GPU proof's CPU-side pieces: comparisons, report digests, the model's two-part transport,
the wheel-set check, the summary, the benchmark's plan and the shell script's argument checks.
(The whole script is rehearsed on CPU with `bash scripts/gpu_proof.sh --rehearse`.)"""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from scripts import gpu_proof, gpu_serving, gpu_transport

REPO = Path(__file__).resolve().parents[1]


def reference(tokens, top_ids, top_logits):
    return gpu_serving.Reference(tokens, top_ids, top_logits)


def test_identical_outputs_match():
    ref = reference([5, 6], [[5, 1], [6, 1]], [[10.0, 2.0], [9.0, 1.0]])
    assert gpu_serving.compare([5, 6], ref, "bfloat16") == {"status": "match"}


def test_divergence_within_bf16_steps_is_a_near_tie():
    ref = reference([5, 6, 7], [[5, 1], [6, 8], [7, 1]], [[10.0, 2.0], [20.0, 19.8], [3.0, 1.0]])
    result = gpu_serving.compare([5, 8, 1], ref, "bfloat16")  # 0.2 <= 0.05 + 20 / 64; later steps not compared
    assert result["status"] == "near-tie" and result["step"] == 1 and result["gap"] == pytest.approx(0.2)


@pytest.mark.parametrize("ours, logits, dtype", [
    ([5, 8], [[10.0, 2.0], [20.0, 19.0]], "bfloat16"),  # gap 1.0 > 0.3625
    ([5, 8], [[10.0, 2.0], [20.0, 19.998]], "float32"),  # gap 2e-3 > 1e-3
    ([5, 9], [[10.0, 2.0], [20.0, 19.99]], "bfloat16"),  # 9 is not among the reference's top-k
])
def test_divergence_beyond_the_tolerance_is_a_mismatch(ours, logits, dtype):
    ref = reference([5, 6], [[5, 1], [6, 8]], logits)
    assert gpu_serving.compare(ours, ref, dtype)["status"] == "mismatch"


def test_missing_tokens_are_a_length_failure():
    ref = reference([5, 6], [[5, 1], [6, 1]], [[1.0, 0.0], [1.0, 0.0]])
    assert gpu_serving.compare([5], ref, "float32") == {"status": "length", "ours": 1, "reference": 2}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a"
name="test_bad"><failure message="assert 1 == 2">long traceback text</failure></testcase></testsuite></testsuites>"""


def test_junit_digest_counts_and_first_failure(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    digest = gpu_proof.junit_digest(path)
    assert digest["status"] == "failed" and (digest["tests"], digest["passed"], digest["skipped"]) == (5, 2, 2)
    assert digest["first_failure"] == {"test": "tests.test_a::test_bad", "message": "assert 1 == 2",
                                       "text": "long traceback text"}
    path.write_text(JUNIT.replace('failures="1"', 'failures="0"').replace(
        '<failure message="assert 1 == 2">long traceback text</failure>', ""))
    assert gpu_proof.junit_digest(path)["status"] == "passed"
    assert gpu_proof.junit_digest(tmp_path / "absent.xml")["status"] == "no report"


def test_model_travels_in_two_parts_and_is_verified(tmp_path):
    gguf = tmp_path / gpu_transport.GGUF_NAME
    gguf.write_bytes(bytes(range(256)) * 41 + b"tail")
    carried, staging = tmp_path / "carried", tmp_path / "staging"
    parts = gpu_transport.stage_model(gguf, carried)
    assert [p.parent.name for p in parts] == list(gpu_transport.MODEL_PARTS)
    assert abs(parts[0].stat().st_size - parts[1].stat().st_size) <= 1
    first_call = carried / "first"
    (carried / "model-a").rename(first_call)
    assert gpu_transport.assemble_model([first_call, carried / "model-b-not-yet"], staging) is None  # half the model
    assembled = gpu_transport.assemble_model([carried / "model-b"], staging)  # the next call brings the rest
    assert assembled is not None and assembled.read_bytes() == gguf.read_bytes()
    (staging / f"{gpu_transport.GGUF_NAME}.part1").write_bytes(b"corrupt")
    assembled.unlink()
    assert gpu_transport.assemble_model([], staging) is None


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
                         + [f"Requires-Dist: {r}" for r in requires])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


def project_wheels(folder: Path) -> list[Path]:
    """Stand-ins for the real set: the project's dependencies the image lacks."""
    return [fake_wheel(folder, "grpcio-health-checking", "1.85.1", ["grpcio>=1.85.1", "protobuf<8,>=7.35.1"]),
            fake_wheel(folder, "protobuf", "7.36.2", []), fake_wheel(folder, "grpcio-reflection", "1.85.1", []),
            fake_wheel(folder, "pyzmq", "27.3.0", ['cffi; implementation_name == "pypy"']),
            fake_wheel(folder, "msgspec", "0.23.0", []),
            fake_wheel(folder, "gguf", "0.19.0", ["numpy>=1.17", 'tqdm; extra == "gui"']),
            fake_wheel(folder, "llguidance", "1.9.1", [])]


def test_wheel_set_check_finds_what_is_missing(tmp_path):
    wheels = project_wheels(tmp_path)
    assert gpu_transport.check_wheel_set(wheels) == []
    without_msgspec = [w for w in wheels if "msgspec" not in w.name]
    assert gpu_transport.check_wheel_set(without_msgspec) == [
        "the project needs msgspec>=0.19: neither carried nor in the GPU image"]
    old = fake_wheel(tmp_path, "protobuf", "6.31.0", [])
    problems = gpu_transport.check_wheel_set(wheels + [old])
    assert "protobuf: two versions carried (7.36.2, 6.31.0)" in problems
    odd = fake_wheel(tmp_path, "oddball", "1.0", ["left-pad>=1"])
    assert gpu_transport.check_wheel_set(wheels + [odd]) == ["oddball needs left-pad>=1: neither carried nor in the GPU image"]


def test_serving_ratios():
    runs = {"continuous-rateinf": {"output_tok_s": 300.0}, "static-rateinf": {"output_tok_s": 100.0},
            "continuous-rate4": {"output_tok_s": 90.0}, "static-rate4": {"output_tok_s": 60.0},
            "transformers": {"output_tok_s": 50.0}}
    assert gpu_serving.serving_ratios(runs) == {"continuous/static at rate inf": 3.0, "continuous/transformers, all at once": 6.0,
                                       "continuous/static at rate 4": 1.5}


def test_summary_reads_every_step(tmp_path, capsys):
    (tmp_path / "steps.jsonl").write_text(
        '{"step": "kernels", "status": "passed", "rc": 0, "seconds": 61, "note": "log: 1-kernels.log"}\n'
        '{"step": "serving", "status": "skipped", "rc": 0, "seconds": 0, "note": "90s left"}\n')
    (tmp_path / "kernels.xml").write_text(JUNIT)
    gpu_serving.write_json(tmp_path / "equivalence.json", {"model": "default model", "status": "failed", "variants": {
        "cuda-bf16": {"status": "failed", "match": 7, "mismatch": 1, "prompts": []}}})
    gpu_serving.write_json(tmp_path / "attention.json", {"device": "NVIDIA H200", "copy_bytes_per_s": 4.3e12, "complete": True,
                                                "rows": [{"kind": "decode", "batch": 64, "context": 4096, "bytes": 9,
                                                          "us": 1.0, "gb_per_s": 9.0, "pct_copy_bw": 80.0,
                                                          "vs_sdpa": 0.9}]})
    summary = gpu_proof.summarize(tmp_path)
    assert [s["step"] for s in summary["steps"]] == ["kernels", "serving"]
    assert summary["kernels"]["first_failure"]["test"] == "tests.test_a::test_bad"
    assert summary["equivalence"]["variants"] == {"cuda-bf16": {"status": "failed", "match": 7, "mismatch": 1}}
    assert summary["bench"]["largest"]["decode"]["pct_copy_bw"] == 80.0 and summary["bench"]["largest"]["prefill"] is None
    assert summary["serving"] is None
    gpu_proof.print_summary(summary)
    assert "equivalence cuda-bf16" in capsys.readouterr().out


def test_benchmark_plan_needs_no_gpu(tmp_path):
    from kernels import bench

    out = tmp_path / "attention.json"
    bench.main(["--short", "--plan", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["complete"] is False
    kinds = [p[0] for p in result["skipped"]]
    assert kinds[:2] == ["decode", "prefill"] and result["skipped"][0][1:3] == [256, 4096]  # largest first


@pytest.mark.parametrize("args, message", [(["--budget", "5m"], "--budget must be whole seconds"),
                                           (["--steps", "kernels,fly"], "unknown step 'fly'"),
                                           (["--frobnicate"], "unknown argument")])
def test_script_rejects_bad_arguments(args, message):
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_proof.sh"), *args], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2 and message in run.stderr


def test_script_help_lists_the_steps():
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_proof.sh"), "--help"], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0
    for step in ("kernels", "equivalence", "bench", "serving"):
        assert step in run.stdout
