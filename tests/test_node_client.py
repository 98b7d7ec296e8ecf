"""The Node.js example client (clients/node/generate.js) against a live server: the same request
gives exactly the tokens and text the Python stub gets; errors, Ctrl-C and mTLS behave as documented."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clients.client import tls_credentials
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.tls import TlsConfig
from tests.server_harness import ServerThread, collect_tokens

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "clients" / "node"
GENERATE_JS = NODE_CLIENT / "generate.js"

# One torch thread in the worker: on a busy 2-core machine OpenMP threads that spin waiting for a
# descheduled sibling make each decode step cost whole time slices (seconds per token).

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        shutil.which("node") is None or shutil.which("npm") is None,
        reason="node and npm are not on PATH: the Node.js client cannot run",
    ),
]


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """clients/node/node_modules, installed from the committed lock file when missing (a clean clone)."""
    installed = NODE_CLIENT / "node_modules"
    if not all((installed / "@grpc" / name).is_dir() for name in ("grpc-js", "proto-loader")):
        # No install scripts: the client needs none, and a test run should not execute any.
        run = subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, f"npm ci failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return installed


@pytest.fixture(scope="module")
def server(model_dir, node_modules):
    running = ServerThread(model_dir, num_kv_blocks=64).start()
    yield running
    running.stop()


def node_generate(target: str, *flags: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(GENERATE_JS), "--target", target, *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )


def summary_of(run: subprocess.CompletedProcess) -> dict:
    """The JSON line generate.js writes to stderr when a generation finishes."""
    assert run.returncode == 0, run.stderr
    return json.loads(run.stderr.strip().splitlines()[-1])


CASES = {
    "greedy prompt": (
        ["--prompt", "The three primary colours are", "--max-tokens", "12", "--temperature", "0", "--ignore-eos"],
        pb.GenerateRequest(
            prompt="The three primary colours are",
            sampling=pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        ),
    ),
    "greedy chat": (
        ["--chat", "What is the capital of France?", "--max-tokens", "6", "--temperature", "0", "--ignore-eos"],
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="What is the capital of France?")],
            sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        ),
    ),
    "seeded sampling, 64-bit seed": (
        ["--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0.9", "--top-k", "50",
         "--seed", "18446744073709551557", "--ignore-eos"],
        pb.GenerateRequest(
            prompt="Once upon a time",
            sampling=pb.SamplingParams(max_tokens=6, temperature=0.9, top_k=50, seed=18446744073709551557,
                                       ignore_eos=True),
        ),
    ),
}


@pytest.mark.parametrize("flags, request_pb", CASES.values(), ids=CASES.keys())
def test_node_client_streams_what_the_python_stub_gets(server, flags, request_pb):
    expected_ids, expected_text, last = collect_tokens(server.stub(), request_pb, timeout_s=120)
    run = node_generate(server.target, *flags, "--request-id", "node-client-test")
    summary = summary_of(run)
    assert summary["token_ids"] == expected_ids
    assert run.stdout == expected_text
    assert summary["request_id"] == "node-client-test"
    assert summary["finish_reason"] == pb.FinishReason.Name(last.finish_reason) == "FINISH_REASON_LENGTH"
    assert summary["usage"]["prompt_tokens"] == last.usage.prompt_tokens
    assert summary["usage"]["completion_tokens"] == len(expected_ids)


def test_invalid_request_names_the_field_and_exits_non_zero(server):
    run = node_generate(server.target, "--prompt", "Hello", "--max-tokens", "0")
    assert run.returncode == 1, run.stderr
    assert run.stdout == ""
    assert "INVALID_ARGUMENT: sampling.max_tokens" in run.stderr


def test_bad_flags_exit_2_without_calling(node_modules):
    run = node_generate("127.0.0.1:1", "--prompt", "Hello", "--max-tokens=-3")  # nothing listens on port 1
    assert run.returncode == 2, run.stderr
    assert "--max-tokens: expected an integer >= 0" in run.stderr


def test_ctrl_c_cancels_the_call_and_frees_the_request(server):
    process = subprocess.Popen(
        ["node", str(GENERATE_JS), "--target", server.target, "--prompt", "Once upon a time",
         "--max-tokens", "400", "--ignore-eos"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        process.stdout.read(1)  # streaming has begun
        assert server.call(lambda app: app.engine.num_active_requests) == 1
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "CANCELLED" in stderr
    deadline = time.monotonic() + 10
    while server.call(lambda app: app.engine.num_active_requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.call(lambda app: app.engine.num_active_requests) == 0


def test_mtls_with_ca_cert_and_key(model_dir, node_modules, certs):
    tls = TlsConfig(certs["server_cert"], certs["server_key"], client_ca=certs["ca"])
    with_cert = tls_credentials(certs["ca"], certs["client_cert"], certs["client_key"])
    mtls_server = ServerThread(model_dir, num_kv_blocks=16, tls=tls, credentials=with_cert).start()
    try:
        flags = ["--prompt", "Hello", "--max-tokens", "3", "--ignore-eos"]
        mtls = node_generate(mtls_server.target, *flags, "--ca", str(certs["ca"]),
                             "--cert", str(certs["client_cert"]), "--key", str(certs["client_key"]))
        assert summary_of(mtls)["usage"]["completion_tokens"] == 3
        no_cert = node_generate(mtls_server.target, *flags, "--ca", str(certs["ca"]))
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr, no_cert.stderr
        plain = node_generate(mtls_server.target, *flags)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr
    finally:
        mtls_server.stop()
