"""ModelRunner driven by hand-built StepPlans on a tiny random Llama, against HF `generate`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import transformers

from scheduler_svc.protocol import CachedRequest, NewRequest, SamplingOptions, StepPlan
from worker_svc.input_batch import prepare_inputs
from worker_svc.kv_cache import KVCacheSpec, allocate_kv_caches, cpu_num_blocks
from worker_svc.model_runner import ModelRunner
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.request_state import PlanError, RequestState, ScheduledRequest

BLOCK_SIZE = 4
NUM_BLOCKS = 48
GREEDY = SamplingOptions()

# A tiny model gains nothing from threads (conftest explains the busy-machine slowdown).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # A wide init gives peaked logits, so greedy choices are far from ties.
        initializer_range=0.2,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def our_model(hf_model: transformers.LlamaForCausalLM) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf_model.config)
    model.load_weights(hf_model.state_dict().items())
    return model.eval()


def make_runner(model: LlamaForCausalLM, sampler_seed: int = 0) -> ModelRunner:
    spec = KVCacheSpec(model.num_layers, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                       torch.float32)
    caches = allocate_kv_caches(spec, NUM_BLOCKS, "cpu")
    return ModelRunner(model, caches, BLOCK_SIZE, "cpu", max_model_len=model.max_model_len,
                       sampler_seed=sampler_seed)


def hf_greedy(hf_model: transformers.LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        # An explicit mask: otherwise prompt tokens equal to pad_token_id would be masked out.
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def prompt_of(length: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(256), k=length)


@dataclass
class FakeRequest:
    prompt: list[int]
    max_new: int
    chunk: int | None
    sampling: SamplingOptions
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    sent: bool = False
    num_sent_blocks: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class FakeScheduler:
    """Just enough of a scheduler to drive the runner: block allocation, chunking, preemption."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(free)  # non-contiguous block ids everywhere
        self.free = free
        self.running: dict[str, FakeRequest] = {}
        self.done: dict[str, list[int]] = {}
        self.finished: list[str] = []
        self.step_id = 0

    def add(self, req_id: str, prompt: list[int], max_new: int, chunk: int | None = None,
            sampling: SamplingOptions = GREEDY) -> None:
        self.running[req_id] = FakeRequest(prompt, max_new, chunk, sampling)

    def preempt(self, req_id: str) -> None:
        req = self.running[req_id]
        self._free(req)
        req.num_computed, req.sent, req.num_sent_blocks = 0, False, 0
        self.finished.append(req_id)

    def step(self) -> dict[str, int]:
        new, cached, batch = [], [], []
        for req_id, req in self.running.items():
            num_new = len(req.tokens) - req.num_computed
            if req.chunk is not None:
                num_new = min(num_new, req.chunk)
            self._allocate(req, req.num_computed + num_new)
            if req.sent:
                cached.append(CachedRequest(req_id, req.blocks[req.num_sent_blocks:],
                                            req.num_computed, num_new))
            else:
                new.append(NewRequest(req_id, list(req.tokens), list(req.blocks),
                                      req.num_computed, num_new, req.sampling))
            req.sent, req.num_sent_blocks = True, len(req.blocks)
            batch.append((req_id, num_new))
        plan = StepPlan(self.step_id, new, cached, self.finished)
        self.step_id, self.finished = self.step_id + 1, []
        result = self.runner.execute(plan)
        # Results come in batch order (new then cached), only for requests that sampled.
        expected = [r for r, n in batch if self.running[r].num_computed + n
                    == len(self.running[r].tokens)]
        order = [r.req_id for r in new] + [r.req_id for r in cached]
        assert result.req_ids == [r for r in order if r in expected]
        for req_id, num_new in batch:
            self.running[req_id].num_computed += num_new
        sampled = dict(zip(result.req_ids, result.token_ids, strict=True))
        for req_id, token in sampled.items():
            self._record(req_id, token)
        return sampled

    def run_to_completion(self, max_steps: int = 200) -> dict[str, list[int]]:
        for _ in range(max_steps):
            if not self.running:
                return self.done
            self.step()
        raise AssertionError("requests did not finish")

    def _record(self, req_id: str, token: int) -> None:
        req = self.running[req_id]
        req.outputs.append(token)
        if len(req.outputs) == req.max_new:
            self.done[req_id] = req.outputs
            self._free(req)
            del self.running[req_id]
            self.finished.append(req_id)

    def _allocate(self, req: FakeRequest, num_tokens: int) -> None:
        while len(req.blocks) * BLOCK_SIZE < num_tokens:
            req.blocks.append(self.free.pop(0))

    def _free(self, req: FakeRequest) -> None:
        # Freed blocks go to the front, so the next allocation reuses them (stale K/V inside).
        self.free[:0] = req.blocks
        req.blocks = []


def test_continuous_batching_matches_hf_generate(hf_model, our_model) -> None:
    prompts = {
        "a": (prompt_of(10, 1), 6, None),
        "b": (prompt_of(7, 2), 8, None),
        "c": (prompt_of(13, 3), 5, 5),  # prefilled in chunks of 5, 5, 3
        "d": (prompt_of(3, 4), 9, None),
        "e": (prompt_of(21, 5), 4, 8),
    }
    expected = {r: hf_greedy(hf_model, p, n) for r, (p, n, _) in prompts.items()}

    sched = FakeScheduler(make_runner(our_model))
    sched.add("a", *prompts["a"])
    sched.add("c", *prompts["c"])
    assert sched.step() == {"a": expected["a"][0]}  # c's partial chunk samples nothing
    sched.add("b", *prompts["b"])
    sched.step()  # b prefills while a decodes and c continues its prefill
    sched.step()
    sched.preempt("b")  # recompute-preemption: b comes back later with its outputs
    sched.step()
    sched.add("d", *prompts["d"])
    sched.add("b", prompts["b"][0], prompts["b"][1])
    sched.running["b"].outputs = list(expected["b"][:2])
    sched.step()
    sched.add("e", *prompts["e"])  # arrives after "a" finished: reuses its freed blocks
    done = sched.run_to_completion()
    assert done == expected


def test_prefix_hit_new_request_starts_mid_prompt(hf_model, our_model) -> None:
    runner = make_runner(our_model)
    shared = prompt_of(8, 6)
    first, second = shared + prompt_of(3, 7), shared + prompt_of(5, 8)
    step0 = StepPlan(0, [NewRequest("x", first, [7, 2, 30], 0, len(first), GREEDY)], [], [])
    runner.execute(step0)
    # "y" reuses x's two full blocks: only its last 5 tokens are computed.
    step1 = StepPlan(1, [NewRequest("y", second, [7, 2, 11, 19], 8, 5, GREEDY)], [], [])
    result = runner.execute(step1)
    assert result.token_ids == hf_greedy(hf_model, second, 1)


def test_seeded_sampling_survives_batching_and_preemption(our_model) -> None:
    opts = SamplingOptions(temperature=1.0, top_p=0.95, seed=1234)
    prompt = prompt_of(9, 9)
    alone = FakeScheduler(make_runner(our_model, sampler_seed=1))
    alone.add("s", prompt, 10, sampling=opts)
    reference = alone.run_to_completion()["s"]

    busy = FakeScheduler(make_runner(our_model, sampler_seed=2), seed=3)
    busy.add("noise", prompt_of(6, 10), 12, sampling=SamplingOptions(temperature=1.0))
    busy.add("s", prompt, 10, chunk=4, sampling=opts)
    for _ in range(6):
        busy.step()
    outputs = list(busy.running["s"].outputs)
    assert len(outputs) >= 2
    # Preempted and resent in the same plan: finished_req_ids is applied before new_requests.
    busy.preempt("s")
    busy.add("s", prompt, 10, sampling=opts)
    busy.running["s"].outputs = outputs
    assert busy.run_to_completion()["s"] == reference
    # Unseeded requests in the same runner really do sample (not greedy by accident).
    assert len(set(reference)) > 1


def test_num_computed_tokens_mismatch_raises_and_keeps_state(our_model) -> None:
    runner = make_runner(our_model)
    prompt = prompt_of(6, 11)
    runner.execute(StepPlan(0, [NewRequest("r", prompt, [3, 4], 0, 6, GREEDY)], [], []))
    state = runner.requests["r"]
    snapshot = (list(state.token_ids), list(state.block_table), state.num_computed_tokens)
    with pytest.raises(PlanError, match="num_computed_tokens mismatch"):
        runner.execute(StepPlan(1, [], [CachedRequest("r", [9], 5, 1)], []))
    with pytest.raises(PlanError, match="unknown"):
        runner.execute(StepPlan(1, [], [CachedRequest("r", [], 6, 1),
                                        CachedRequest("ghost", [], 0, 1)], []))
    with pytest.raises(PlanError, match="outside the pool"):
        runner.execute(StepPlan(1, [], [CachedRequest("r", [NUM_BLOCKS], 6, 1)], []))
    with pytest.raises(PlanError, match="cannot compute"):
        runner.execute(StepPlan(1, [], [CachedRequest("r", [], 6, 2)], []))
    assert (state.token_ids, state.block_table, state.num_computed_tokens) == snapshot
    # The rejected plans left the request usable.
    result = runner.execute(StepPlan(1, [], [CachedRequest("r", [], 6, 1)], []))
    assert result.req_ids == ["r"] and state.num_computed_tokens == 7


def test_failed_step_leaves_state_as_the_scheduler_sees_it(hf_model, our_model,
                                                           monkeypatch) -> None:
    runner = make_runner(our_model)
    prompt_a, prompt_b = prompt_of(7, 12), prompt_of(5, 13)
    expected_a, expected_b = hf_greedy(hf_model, prompt_a, 2), hf_greedy(hf_model, prompt_b, 1)
    runner.execute(StepPlan(0, [NewRequest("a", prompt_a, [3, 9], 0, 7, GREEDY)], [], []))
    plan = StepPlan(1, [NewRequest("b", prompt_b, [4, 1], 0, 5, GREEDY)],
                    [CachedRequest("a", [6], 7, 1)], [])
    forward = type(runner.model).forward
    calls = []

    def fail_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return forward(self, *args)

    monkeypatch.setattr(type(runner.model), "forward", fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        runner.execute(plan)
    assert "b" not in runner.requests and runner.requests["a"].block_table == [3, 9]
    # The scheduler resends the same diffs; the retry must give the reference tokens.
    result = runner.execute(plan)
    assert result.req_ids == ["b", "a"]
    assert result.token_ids == [expected_b[0], expected_a[1]]


def test_empty_plan_and_finish_only_plan_skip_the_model(our_model, monkeypatch) -> None:
    runner = make_runner(our_model)
    runner.execute(StepPlan(0, [NewRequest("r", [1, 2, 3], [0], 0, 3, GREEDY)], [], []))

    def fail(*args, **kwargs):
        raise AssertionError("the model must not run")

    monkeypatch.setattr(type(runner.model), "forward", fail)  # class level: undo leaves no trace
    result = runner.execute(StepPlan(7, [], [], ["r", "never-seen"]))
    assert (result.step_id, result.req_ids, result.token_ids) == (7, [], [])
    assert "r" not in runner.requests


def test_prepare_inputs_matches_naive_loop() -> None:
    states = [
        RequestState("p", list(range(100, 111)), [9, 4, 6], 3, GREEDY),  # chunk 3..9
        RequestState("d", list(range(20)), [1, 5, 8, 2, 7], 19, GREEDY),  # decode
        RequestState("q", list(range(50, 55)), [11, 0], 0, GREEDY),  # whole prompt
    ]
    scheduled = [ScheduledRequest(states[0], 6), ScheduledRequest(states[1], 1),
                 ScheduledRequest(states[2], 5)]
    batch = prepare_inputs(scheduled, BLOCK_SIZE)
    ids, pos, slots = [], [], []
    for s in scheduled:
        for i in range(s.start, s.seq_len):
            ids.append(s.state.token_ids[i])
            pos.append(i)
            slots.append(s.state.block_table[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE)
    assert batch.input_ids.tolist() == ids
    assert batch.positions.tolist() == pos
    assert batch.slot_mapping.tolist() == slots
    assert batch.cu_seqlens_q.tolist() == [0, 6, 7, 12]
    assert batch.seq_lens.tolist() == [9, 20, 5]
    assert batch.block_tables.tolist() == [[9, 4, 6, 0, 0], [1, 5, 8, 2, 7], [11, 0, 0, 0, 0]]
    assert batch.logits_indices.tolist() == [6, 11]  # "p" is a partial chunk
    assert batch.sample_req_ids == ["d", "q"] and batch.sample_positions == [20, 5]
    assert batch.block_tables.dtype == np.int32 and batch.slot_mapping.dtype == np.int64


def test_kv_cache_sizing() -> None:
    spec = KVCacheSpec(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64,
                       dtype=torch.bfloat16)
    assert spec.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert cpu_num_blocks(spec, 1.0) == (1 << 30) // spec.bytes_per_block
    caches = allocate_kv_caches(KVCacheSpec(2, 4, 2, 8, torch.float32), 5, "cpu")
    assert len(caches) == 2
    assert all(t.shape == (5, 4, 2, 8) and t.is_contiguous() for pair in caches for t in pair)
    with pytest.raises(ValueError, match="no room"):
        cpu_num_blocks(spec, 1e-6)


@pytest.mark.model
def test_default_model_batched_greedy_matches_hf(default_model, hf_default_model) -> None:
    hf_default_model.generation_config.eos_token_id = None
    hf_default_model.generation_config.pad_token_id = 0
    spec = KVCacheSpec(default_model.num_layers, 16, default_model.num_kv_heads,
                       default_model.head_dim, torch.float32)
    runner = ModelRunner(default_model, allocate_kv_caches(spec, 16, "cpu"), 16, "cpu",
                         max_model_len=default_model.max_model_len)
    prompts = {f"r{i}": random.Random(i).choices(range(default_model.vocab_size), k=n)
               for i, n in enumerate((12, 23, 5))}
    expected = {r: hf_greedy(hf_default_model, p, 5) for r, p in prompts.items()}
    blocks = {"r0": [3, 9], "r1": [0, 14], "r2": [6]}
    new = [NewRequest(r, p, blocks[r], 0, len(p), GREEDY) for r, p in prompts.items()]
    outputs = {r: [t] for r, t in zip(*_ids_tokens(runner.execute(StepPlan(0, new, [], []))))}
    for step in range(1, 5):
        cached = [CachedRequest(r, [], len(p) + step - 1, 1) for r, p in prompts.items()]
        for r, t in zip(*_ids_tokens(runner.execute(StepPlan(step, [], cached, [])))):
            outputs[r].append(t)
    assert outputs == expected


def _ids_tokens(result):
    return result.req_ids, result.token_ids


def test_profile_step_runs_a_maximal_batch_on_a_small_pool(our_model, monkeypatch) -> None:
    runner = make_runner(our_model)
    seen = []
    forward = type(runner.model).forward

    def spy(self, input_ids, positions, kv_caches, attn):
        seen.append((input_ids.shape[0], attn.query_lens_cpu, positions.max().item()))
        return forward(self, input_ids, positions, kv_caches, attn)

    monkeypatch.setattr(type(runner.model), "forward", spy)
    runner.profile_step(num_tokens=500)  # more tokens than the 48 * 4-slot pool holds
    capacity = NUM_BLOCKS * BLOCK_SIZE
    assert seen == [(500, [capacity, capacity, 500 - 2 * capacity], capacity - 1)]
    assert len(runner.requests) == 0
