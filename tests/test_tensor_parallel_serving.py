"""Tensor parallelism served (CPU, gloo): one scheduler, N worker ranks, the outputs of one worker.

- `omnibus serve --tensor-parallel-size 3` on the default model (9 query / 3 KV heads: 3 and 1 per
  rank) gives transformers' greedy outputs for the spine's prompts sent concurrently.
- TP=2 on random weights with 8 query / 2 KV heads equals TP=1 on the same weights, also through
  chunked prefill, prefix-cache hits and preemption.
- SIGKILL of either rank mid-stream is the group's death: health NOT_SERVING, both ranks started
  again, the streams resume with the tokens an undisturbed run gives.

Comparisons follow the spine's rule: token for token, a divergence only at a near-tie (top-2 gap
of the reference < 1e-3, from transformers' scores or from the TP=1 server's logprobs).
"""

from __future__ import annotations

import json
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnibus.v1 import generation_pb2 as pb
from omnibus.v1 import generation_pb2_grpc as pb_grpc
from scheduler_svc.worker_link_security import generate_keys
from tests.greedy_reference import NUM_NEW_TOKENS, assert_all_match, assert_matches_reference
from tests.hardening_support import write_tiny_model_dir
from tests.server_harness import ServerThread, collect_tokens, free_port, greedy_request
from tests.test_cli import OMNIBUS, LoggedProcess, worker_pids
from tests.test_worker_death import metric, read_to_the_end, wait_for_health

pytestmark = pytest.mark.model

RANDOM_PROMPT_LENS = (3, 17, 64, 150, 290, 31, 9, 200)
RANDOM_NEW_TOKENS = 24
TOP_2 = 2


def write_random_model_dir(path: Path) -> Path:
    """A Llama config with 8 query and 2 KV heads of 64 dims over the tiny tokenizer, for
    `--load-format random`: initializer_range 0.1 makes logits far from ties (std ~2)."""
    write_tiny_model_dir(path)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1058, hidden_size=512,
                  intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.1,
                  tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory) -> Path:
    return write_random_model_dir(tmp_path_factory.mktemp("tp-random-model"))


@pytest.fixture(scope="module")
def random_prompts() -> list[list[int]]:
    rng = random.Random(18)
    return [[rng.randrange(1056) for _ in range(n)] for n in RANDOM_PROMPT_LENS]


def random_server(model_dir: Path, world_size: int, num_kv_blocks: int = 256,
                  worker_args: tuple[str, ...] = ("--load-format", "random"), **options) -> ServerThread:
    return ServerThread(model_dir, num_kv_blocks, world_size=world_size, worker_args=list(worker_args),
                        **options).start()


@pytest.fixture(scope="module")
def tp1_reference(random_model_dir, random_prompts) -> list[tuple[list[int], list[float]]]:
    """Per prompt, from a TP=1 server on the same random weights: greedy tokens and the top-2
    logprob gap (= logit gap) at each step."""
    server = random_server(random_model_dir, world_size=1)
    try:
        stub = server.stub()
        requests = [greedy_request(p, RANDOM_NEW_TOKENS, logprobs=TOP_2) for p in random_prompts]
        with ThreadPoolExecutor(len(requests)) as pool:
            streams = list(pool.map(lambda r: list(stub.Generate(r, timeout=300)), requests))
    finally:
        server.stop()
    reference = []
    for responses in streams:
        tokens = [t for r in responses for t in r.token_ids]
        gaps = [lp.top[0].logprob - lp.top[1].logprob for r in responses for lp in r.logprobs]
        reference.append((tokens, gaps))
    return reference


def generate_all(server: ServerThread, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: collect_tokens(stub, greedy_request(p, max_tokens))[0], prompts))


def test_serve_tensor_parallel_3_matches_transformers_concurrently(model_dir, spine_prompts, spine_reference):
    port = free_port()
    server = LoggedProcess([*OMNIBUS, "serve", "--tensor-parallel-size", "3", "--port", str(port),
                            "--model", str(model_dir), "--metrics-port", "0", "--num-kv-blocks", "512"])
    try:
        server.wait_for("ready: serving", timeout_s=300)
        assert len(worker_pids(server.process.pid)) == 3
        assert "worker 2 of 3 ready" in server.output()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GenerationStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.num_workers == 3
        with ThreadPoolExecutor(len(spine_prompts)) as pool:
            results = list(pool.map(lambda p: collect_tokens(stub, greedy_request(p, NUM_NEW_TOKENS)), spine_prompts))
        assert_all_match([tokens for tokens, _, _ in results], spine_reference, "at --tensor-parallel-size 3")
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(60) == 0, server.output()[-3000:]
        channel.close()
    finally:
        server.kill()


def test_serve_refuses_a_size_the_heads_do_not_divide_by(model_dir):
    server = LoggedProcess([*OMNIBUS, "serve", "--tensor-parallel-size", "2", "--port", str(free_port()),
                            "--model", str(model_dir), "--metrics-port", "0"])
    try:
        assert server.process.wait(120) != 0
        assert "tensor parallel size 2 must divide num_attention_heads=9, num_key_value_heads=3" in server.output()
        assert not worker_pids(server.process.pid)
    finally:
        server.kill()


def test_tensor_parallel_2_equals_tensor_parallel_1_on_the_same_weights(random_model_dir, random_prompts,
                                                                         tp1_reference):
    server = random_server(random_model_dir, world_size=2)
    try:
        outputs = generate_all(server, random_prompts, RANDOM_NEW_TOKENS)
        assert_all_match(outputs, tp1_reference, "at TP=2 vs TP=1")
        hellos = server.call(lambda app: app.workers.hellos)
        assert [h.rank for h in hellos] == [0, 1] and {h.world_size for h in hellos} == {2}
    finally:
        server.stop()


def test_chunked_prefill_prefix_hits_and_preemption_under_tensor_parallelism(random_model_dir, random_prompts,
                                                                             tp1_reference):
    """A pool of 24 blocks (384 tokens) for 8 prompts of up to 290 tokens, 32 tokens a step."""
    server = random_server(random_model_dir, world_size=2, num_kv_blocks=24, max_num_batched_tokens=32,
                           max_num_seqs=8)
    try:
        outputs = generate_all(server, random_prompts, RANDOM_NEW_TOKENS)
        assert_all_match(outputs, tp1_reference, "at TP=2 under preemption and chunked prefill")
        records = server.call(lambda app: list(app.engine.scheduler.records))
        assert sum(len(r.preempted_req_ids) for r in records) > 0, "the tiny pool never preempted"
        assert max(sum(r.num_scheduled_tokens.values()) for r in records) <= 32
        assert any(max(r.num_scheduled_tokens.values()) > 1 and 1 in r.num_scheduled_tokens.values()
                   for r in records), "no step ran a prompt chunk beside decoding requests"

        stub = server.stub()
        prompt, (expected, gaps) = random_prompts[4], tp1_reference[4]
        tokens, _, last = collect_tokens(stub, greedy_request(prompt, RANDOM_NEW_TOKENS))
        tokens, _, last = collect_tokens(stub, greedy_request(prompt, RANDOM_NEW_TOKENS))  # now surely cached
        assert last.usage.cached_prompt_tokens == (len(prompt) - 1) // 16 * 16
        assert_matches_reference(tokens, expected, gaps, "prompt 4 from the prefix cache at TP=2")
        assert server.call(lambda app: app.engine.scheduler.block_manager.num_free_blocks) == 24
    finally:
        server.stop()


def test_scheduler_and_ranks_started_apart_from_the_launcher_variables(random_model_dir, random_prompts,
                                                                       tp1_reference):
    """As Slurm or Kubernetes would: `omnibus scheduler --tensor-parallel-size 2`, then each rank an
    `omnibus worker` that learns its place from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    port, worker_port, rendezvous_port = free_port(), free_port(), free_port()
    scheduler = LoggedProcess([*OMNIBUS, "scheduler", "--tensor-parallel-size", "2", "--port", str(port),
                               "--model", str(random_model_dir), "--metrics-port", "0",
                               "--worker-bind", f"tcp://127.0.0.1:{worker_port}"])
    ranks: list[LoggedProcess] = []
    try:
        scheduler.wait_for("waiting for 2 worker(s)", timeout_s=60)
        for rank in (1, 0):  # any order: the rendezvous waits for both
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(rendezvous_port)}
            ranks.append(LoggedProcess([*OMNIBUS, "worker", "--scheduler", f"tcp://127.0.0.1:{worker_port}",
                                        "--model", str(random_model_dir), "--load-format", "random",
                                        "--device", "cpu", "--num-kv-blocks", "64"], env=env))
        scheduler.wait_for("ready: serving", timeout_s=180)
        assert "joining the gloo group at env://" in ranks[0].output()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(random_prompts)) as pool:
            outputs = list(pool.map(lambda p: collect_tokens(stub, greedy_request(p, RANDOM_NEW_TOKENS))[0],
                                    random_prompts))
        assert_all_match(outputs, tp1_reference, "from ranks started apart")
        channel.close()
        scheduler.process.send_signal(signal.SIGTERM)
        assert scheduler.process.wait(30) == 0
        for rank in ranks:
            assert rank.process.wait(30) == 0, "a rank should exit on the scheduler's Shutdown"
    finally:
        scheduler.kill()
        for rank in ranks:
            rank.kill()


def test_every_rank_registers_over_a_keyed_link(random_model_dir, random_prompts, tp1_reference, tmp_path):
    """With --worker-keys the scheduler accepts each rank by its own key pair (keygen --workers 2)."""
    keys = tmp_path / "keys"
    generate_keys(keys, num_workers=2)
    server = random_server(random_model_dir, world_size=2, worker_keys=keys,
                           worker_args=["--load-format", "random", "--worker-keys", str(keys)])
    try:
        assert server.app.workers.curve is not None
        assert [h.rank for h in server.call(lambda app: app.workers.hellos)] == [0, 1]
        tokens, _, _ = collect_tokens(server.stub(), greedy_request(random_prompts[1], RANDOM_NEW_TOKENS))
        assert_matches_reference(tokens, *tp1_reference[1], "prompt 1 over a keyed link at TP=2")
    finally:
        server.stop()


def test_killing_either_rank_mid_stream_is_the_group_death_and_streams_resume(random_model_dir, random_prompts):
    server = random_server(random_model_dir, world_size=2, metrics_port=0, max_worker_restarts=2)
    try:
        stub = server.stub()
        health = health_pb2_grpc.HealthStub(server.channel())
        requests = [greedy_request(p, 400) for p in random_prompts[:3]]
        undisturbed = [collect_tokens(stub, r)[0] for r in requests]
        for restarts, victim in enumerate((1, 0), start=1):
            before = [p.pid for p in server.processes]
            calls = [stub.Generate(r, timeout=300) for r in requests]
            streamed = [list(next(call).token_ids) for call in calls]  # all three are generating
            server.processes[victim].send_signal(signal.SIGKILL)
            wait_for_health(health, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=5)
            read_to_the_end(calls, streamed, timeout_s=300)
            assert streamed == undisturbed, f"streams after killing rank {victim} differ from an undisturbed run"
            wait_for_health(health, health_pb2.HealthCheckResponse.SERVING, timeout_s=60)
            after = [p.pid for p in server.processes]
            assert len(after) == 2 and not set(after) & set(before), "the whole group is started again"
            assert metric(server.app.metrics_port, "omnibus_worker_restarts_total") == restarts
        assert server.call(lambda app: app.engine.scheduler.block_manager.num_free_blocks) == 256
    finally:
        server.stop()
