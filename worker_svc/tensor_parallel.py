"""Tensor parallelism applied to a built model: rank r of N keeps 1/N of each layer, gpt-fast style.

`worker_svc/models/llama.py` stays single-device; `shard_model` rewrites a built, loaded
`LlamaForCausalLM` in place for one rank of a `torch.distributed` process group (Megatron-LM's
split, as vLLM and gpt-fast do it):

- `qkv_proj` and `gate_up_proj` are column-parallel: each rank keeps its rows of the fused weight,
  sliced per part (its query heads, its KV heads, its V heads; its gate rows, its up rows), so the
  fused layout survives and the attention runs unchanged on `num_heads / N` query heads and
  `num_kv_heads / N` KV heads. Query head `h` reads KV head `h // (num_heads / num_kv_heads)`;
  contiguous head ranges keep every query head on the rank that holds its KV head.
- `o_proj` and `down_proj` are row-parallel: each rank multiplies its slice of the input features
  and one `all_reduce` (sum) per projection restores the full hidden state, so two collectives
  per layer and nothing else. The bias is added once, after the reduce, not N times.
- The embedding and the LM head stay replicated. Vocab-parallel would save their memory (a tenth
  of the default model) at the price of an all-reduce after the embedding and a gather of the
  logits every step; on small models that latency costs more than the memory is worth. Whether
  it pays on large ones is a later measurement.

Only rank 0 computes logits and samples; `share_sampled_tokens` broadcasts its tokens, so every
rank appends the same token to its copy of each request (a rank that appended another would feed
its peers' all-reduces a different sequence). Computing the logits everywhere and trusting every
rank to pick the same token would save that one small broadcast, but would rest on every rank's LM
head and sampler giving bitwise the same result, which ranks on different CPUs or thread counts
need not.

Each rank's KV cache holds only its own KV heads (`local_num_kv_heads`) under the same block ids,
so the scheduler's block tables and slot mappings are shared by all ranks unchanged. Shard before
`worker_svc.cpu_linear.pack_linears`: the shards are plain `Linear`s, which it then packs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

from worker_svc.models.llama import Linear, LlamaAttention, LlamaForCausalLM, LlamaMLP
from worker_svc.parallel_config import ParallelConfig, check_shardable

__all__ = ["ParallelConfig", "RowParallelLinear", "check_shardable", "local_num_kv_heads", "shard_model",
           "share_sampled_tokens"]


class RowParallelLinear(nn.Module):
    """This rank's input-feature slice of a `Linear`, summed over the group, then the bias.

    The slice is a plain bias-free `Linear` child so that weight packing can replace it.
    """

    def __init__(self, shard: Linear, bias: torch.Tensor | None, group: dist.ProcessGroup | None):
        super().__init__()
        self.shard = shard
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shard(x)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out if self.bias is None else out + self.bias


def local_num_kv_heads(config: PretrainedConfig, world_size: int) -> int:
    """KV heads one rank's cache holds (its `KVCacheSpec.num_kv_heads`)."""
    check_shardable(config, world_size)
    return config.num_key_value_heads // world_size


def shard_model(
    model: LlamaForCausalLM, parallel: ParallelConfig, group: dist.ProcessGroup | None = None
) -> LlamaForCausalLM:
    """Keep rank `parallel.rank`'s share of every layer of `model`, in place; returns `model`.

    Call once, after the weights are loaded (loading targets the full fused shapes, so each rank
    briefly holds the whole model) and before `pack_linears`. With `world_size` 1 the model is
    returned untouched.
    """
    check_shardable(model.config, parallel.world_size)
    if parallel.world_size == 1:
        return model
    _check_group(parallel, group)
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, parallel, group)
        _shard_mlp(layer.mlp, parallel, group)
    return model


def _check_group(parallel: ParallelConfig, group: dist.ProcessGroup | None) -> None:
    if not dist.is_initialized():
        raise ValueError("tensor parallelism needs torch.distributed initialised first")
    actual = ParallelConfig(dist.get_rank(group), dist.get_world_size(group))
    if actual != parallel:
        raise ValueError(f"{parallel} does not match the process group's {actual}")


def _shard_attention(
    attn: LlamaAttention, parallel: ParallelConfig, group: dist.ProcessGroup | None
) -> None:
    q_size, kv_size = attn.q_size, attn.kv_size
    q_local, kv_local = q_size // parallel.world_size, kv_size // parallel.world_size
    parts = [(0, q_local), (q_size, kv_local), (q_size + kv_size, kv_local)]  # q, k, v
    _keep_rows(attn.qkv_proj, parts, parallel.rank)
    attn.o_proj = _row_parallel(attn.o_proj, q_local, parallel.rank, group)
    attn.num_heads //= parallel.world_size
    attn.num_kv_heads //= parallel.world_size
    attn.q_size, attn.kv_size = q_local, kv_local


def _shard_mlp(mlp: LlamaMLP, parallel: ParallelConfig, group: dist.ProcessGroup | None) -> None:
    local = mlp.intermediate_size // parallel.world_size
    _keep_rows(mlp.gate_up_proj, [(0, local), (mlp.intermediate_size, local)], parallel.rank)
    mlp.down_proj = _row_parallel(mlp.down_proj, local, parallel.rank, group)
    mlp.intermediate_size = local


def _keep_rows(linear: Linear, parts: list[tuple[int, int]], rank: int) -> None:
    """Column-parallel: from each fused part `(start, rows per rank)` keep rank `rank`'s rows."""

    def take(tensor: torch.Tensor) -> nn.Parameter:
        pieces = [tensor.narrow(0, start + rank * rows, rows) for start, rows in parts]
        return nn.Parameter(torch.cat(pieces).contiguous(), requires_grad=False)

    linear.weight = take(linear.weight.data)
    if linear.bias is not None:
        linear.bias = take(linear.bias.data)


def _row_parallel(
    linear: Linear, in_per_rank: int, rank: int, group: dist.ProcessGroup | None
) -> RowParallelLinear:
    weight = linear.weight.data.narrow(1, rank * in_per_rank, in_per_rank)
    with torch.device("meta"):  # no throwaway allocation: the slice becomes the weight
        shard = Linear(in_per_rank, weight.shape[0], bias=False)
    shard.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    bias = None if linear.bias is None else linear.bias.data
    return RowParallelLinear(shard, bias, group)


def share_sampled_tokens(tokens: torch.Tensor | None, num_rows: int, device: torch.device,
                         group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank 0's sampled token ids (int64, `[num_rows]`) on every rank: rank 0 passes its tokens,
    the others None. Every rank must call it at the same point of the same step."""
    if tokens is None:
        tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    elif tokens.dtype != torch.int64 or not tokens.is_contiguous():
        tokens = tokens.to(torch.int64).contiguous()
    dist.broadcast(tokens, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return tokens
