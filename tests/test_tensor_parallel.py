"""Tensor-parallel sharding against the unsharded model: gloo ranks in spawned processes (CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from benchmarks.rank_processes import free_port, join_or_kill
from kernels.reference import AttentionOps
from worker_svc.attention_metadata import AttentionMetadata, positions_for
from worker_svc.cpu_fused_ops import use_fused_cpu_ops
from worker_svc.kv_cache import KVCacheSpec, allocate_kv_caches
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.tensor_parallel import (
    ParallelConfig,
    _shard_attention,
    _shard_mlp,
    local_num_kv_heads,
    shard_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (world size, config overrides): the spine's random-weights layout with Llama's attention and MLP
# biases (bias after the reduce, sliced q/k/v biases); the default model's 9 query / 3 KV heads,
# tied embeddings and no biases.
CASES = {
    "tp2-8q-2kv-biases": (2, dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                  attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "tp3-9q-3kv-tied": (3, dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                                tie_word_embeddings=True)),
}
PROMPT_LENS = (13, 5, 21)
FIRST_CHUNK = {2: 12}  # the longest prompt's prefill is chunked over two steps
DECODE_STEPS = 4
BLOCK_SIZE, NUM_BLOCKS = 4, 32
RANKS_TIMEOUT_S = 90


@dataclass(slots=True)
class Generation:
    logits: list[torch.Tensor]  # per step: float32 logits of every computed position
    tokens: list[list[int]]  # per sequence: prompt then greedy tokens


def tiny_config(overrides: dict) -> transformers.LlamaConfig:
    base = dict(vocab_size=211, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=256, rms_norm_eps=1e-6)
    return transformers.LlamaConfig(**{**base, **overrides})


def build_model(config: transformers.LlamaConfig, seed: int) -> LlamaForCausalLM:
    """The same random model in every process: weights, biases and norms all drawn from `seed`."""
    model = LlamaForCausalLM(config, AttentionOps())
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.1
        param.data.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def generate(model: LlamaForCausalLM, num_kv_heads: int, seed: int) -> Generation:
    """Chunked prefill of three prompts, then greedy decodes, over this rank's own paged cache
    and block ids drawn from `seed` (the same on every rank, as the scheduler's would be)."""
    generator = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(model.vocab_size, (n,), generator=generator).tolist()
            for n in PROMPT_LENS]
    free_blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    spec = KVCacheSpec(model.num_layers, BLOCK_SIZE, num_kv_heads, model.head_dim, torch.float32)
    kv_caches = allocate_kv_caches(spec, NUM_BLOCKS, "cpu")
    tables: list[list[int]] = [[] for _ in seqs]
    computed = [0] * len(seqs)
    steps: list[torch.Tensor] = []
    for step in range(1 + len(FIRST_CHUNK) + DECODE_STEPS):
        seq_lens = [FIRST_CHUNK.get(i, len(s)) if step == 0 else len(s) for i, s in enumerate(seqs)]
        for table, seq_len in zip(tables, seq_lens):
            while len(table) * BLOCK_SIZE < seq_len:
                table.append(free_blocks.pop())
        query_lens = [end - done for end, done in zip(seq_lens, computed)]
        input_ids = [t for s, done, end in zip(seqs, computed, seq_lens) for t in s[done:end]]
        attn = AttentionMetadata.build(tables, seq_lens, query_lens, BLOCK_SIZE)
        with torch.inference_mode():
            positions = positions_for(seq_lens, query_lens)
            hidden = model(torch.tensor(input_ids), positions, kv_caches, attn)
            logits = model.compute_logits(hidden)
        steps.append(logits)
        for seq, end, seq_logits in zip(seqs, seq_lens, logits.split(query_lens)):
            if end == len(seq):  # prefill done or a decode: feed back the greedy token
                seq.append(int(seq_logits[-1].argmax()))
        computed = seq_lens
    return Generation(steps, seqs)


def run_rank(rank: int, world_size: int, port: int, overrides: dict, seed: int, out: Path,
             fused_ops: bool = False) -> None:
    """One spawned rank: join the gloo group, shard the shared random model (with the CPU
    elementwise kernels if `fused_ops`), generate, save."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=RANKS_TIMEOUT_S))
    try:
        config = tiny_config(overrides)
        model = shard_model(build_model(config, seed), ParallelConfig(rank, world_size))
        if fused_ops:
            assert use_fused_cpu_ops(model) is not None, "the CPU elementwise kernels did not load"
        result = generate(model, local_num_kv_heads(config, world_size), seed)
        torch.save({"logits": result.logits, "tokens": result.tokens}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, overrides: dict, seed: int, out: Path, fused_ops: bool = False) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run_rank, args=(r, world_size, port, overrides, seed, out, fused_ops))
             for r in range(world_size)]
    for p in procs:
        p.start()
    join_or_kill(procs, RANKS_TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0] * world_size, "a rank failed (its traceback is above)"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_ranks_match_the_unsharded_model(case, seed, tmp_path):
    world_size, overrides = CASES[case]
    config = tiny_config(overrides)
    ranks = run_ranks(world_size, overrides, seed, tmp_path)
    reference = generate(build_model(config, seed), config.num_key_value_heads, seed)
    first = ranks[0]
    assert first["tokens"] == reference.tokens
    assert len(first["logits"]) == len(reference.logits)
    for step, (ours, expected) in enumerate(zip(first["logits"], reference.logits)):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    for rank, other in enumerate(ranks[1:], start=1):
        # Bitwise, not close: every rank samples from its own logits and must pick the same token.
        assert all(torch.equal(a, b) for a, b in zip(other["logits"], first["logits"])), rank
        assert other["tokens"] == first["tokens"], rank


def test_shard_rewrites_each_layer_to_its_share():
    config = tiny_config(CASES["tp2-8q-2kv-biases"][1])
    model = build_model(config, seed=0)
    full = model.model.layers[0]
    qkv_w, o_w = full.self_attn.qkv_proj.weight.clone(), full.self_attn.o_proj.weight.clone()
    gate_up_b = full.mlp.gate_up_proj.bias.clone()
    sharded = shard_model(build_model(config, seed=0), ParallelConfig(rank=0, world_size=1))
    assert sharded.model.layers[0].self_attn.num_heads == 8  # world size 1: untouched
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        shard_model(model, ParallelConfig(rank=1, world_size=2))
    assert attn.num_heads == 8 and attn.qkv_proj.weight.shape[0] == 8 * 8 + 2 * 2 * 8  # unchanged

    # Rank 1 of 2 by hand (shard_model's private steps, without a process group): query heads
    # 4-7, KV head 1 of K and of V; the second halves of gate and of up; o's last input columns.
    _shard_attention(attn, ParallelConfig(1, 2), group=None)
    _shard_mlp(mlp, ParallelConfig(1, 2), group=None)
    assert (attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size) == (4, 1, 32, 8)
    expected_qkv = torch.cat([qkv_w[32:64], qkv_w[64 + 8:64 + 16], qkv_w[80 + 8:80 + 16]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.o_proj.shard.weight, o_w[:, 32:])
    assert attn.o_proj.shard.bias is None and attn.o_proj.bias is not None
    assert mlp.intermediate_size == 48
    assert torch.equal(mlp.gate_up_proj.bias, torch.cat([gate_up_b[48:96], gate_up_b[144:]]))


@pytest.mark.parametrize(
    ("overrides", "world_size", "names"),
    [
        (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72), 2,
         "num_attention_heads=9, num_key_value_heads=3"),
        (dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64), 4,
         "num_key_value_heads=2"),
        (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72, intermediate_size=100),
         3, "intermediate_size=100"),
    ],
)
def test_sizes_that_do_not_divide_are_rejected(overrides, world_size, names):
    config = tiny_config(overrides)
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=f"tensor parallel size {world_size} must divide {names} "):
        shard_model(model, ParallelConfig(rank=0, world_size=world_size))
    with pytest.raises(ValueError, match=names):
        local_num_kv_heads(config, world_size)
    assert model.model.layers[0].self_attn.num_heads == config.num_attention_heads  # untouched


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_parallel_config_rejects_impossible_ranks(rank, world_size):
    with pytest.raises(ValueError, match="rank must be|world_size must be"):
        ParallelConfig(rank=rank, world_size=world_size)
