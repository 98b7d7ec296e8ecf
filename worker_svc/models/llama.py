"""Llama-family decoder over the paged KV cache (Llama, SmolLM2, Mistral, Qwen2 layouts).

Single-device on purpose: tensor parallelism shards a built model from its own module. The model
sees one flattened varlen batch per step (prefill chunks and decodes together) and reads and writes
the cache only through `attn_ops`, so the CUDA kernels replace the torch reference without touching
this file. Its small per-token ops (RMSNorm with the residual add, SiLU-and-mul, rotary) go through
`ElementwiseOps` the same way: plain torch here, C++ kernels from `worker_svc.cpu_fused_ops`.
Parameters are created uninitialised (`torch.empty`): loading fills every one of them, and
`worker_svc.model_store` initialises them for `load_format="random"`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kernels.reference import AttentionOps
from worker_svc.attention_metadata import AttentionMetadata

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

KVCache = tuple[torch.Tensor, torch.Tensor]


class Linear(nn.Module):
    """`y = x W^T + b` with uninitialised parameters (a checkpoint or a random init fills them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dimension."""
    # Normalise in float32 and scale in the model dtype, exactly as Hugging Face does, so bf16
    # outputs agree bit for bit rather than within a rounding step. In float32 torch's fused op
    # computes the same thing bit for bit (tested) in one call instead of six.
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(x + residual)`, `x + residual`): a layer's residual add and the next norm."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up` `[T, 2 * I]` = `[gate | up]`."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding; scaled variants (linear, dynamic, llama3, yarn...) come from
    transformers' `ROPE_INIT_FUNCTIONS`, so their frequency maths is not copied here."""

    def __init__(self, config: PretrainedConfig, head_dim: int):
        super().__init__()
        rope_type = _rope_parameters(config).get("rope_type", "default")
        if rope_type == "default":
            inv_freq, self.attention_scaling = _default_inv_freq(config, head_dim), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            # Dynamic NTK only changes past max_position_embeddings, which we never serve.
            init = ROPE_INIT_FUNCTIONS[rope_type]
            inv_freq, self.attention_scaling = init(config, torch.device("cpu"))
        else:
            raise NotImplementedError(f"rope type {rope_type!r} is not supported")
        if inv_freq.numel() * 2 != head_dim:
            raise NotImplementedError("partial rotary embeddings are not supported")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, head_dim]` for `positions` `[T]`."""
        # .float(): a model cast with .to(bf16) casts buffers too; frequencies must stay fp32.
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]` by per-token `cos`/`sin` `[T, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass(frozen=True, slots=True)
class ElementwiseOps:
    """The decoder's small per-token ops; a faster implementation with these signatures plugs in.

    An op may overwrite the activations it is given (`x` and `residual` of `add_rms_norm`, `x` of
    `rotary`; never a weight) and returns its results: the torch versions allocate, in-place
    kernels return their inputs, and neither has to copy to suit the other.
    """

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ] = add_rms_norm
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: ElementwiseOps | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self.elementwise_ops = ops or ElementwiseOps()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`rms_norm(x)`; with `residual`, (`rms_norm(x + residual)`, `x + residual`), vLLM's
        fused residual add (either input may be overwritten)."""
        if residual is None:
            return self.elementwise_ops.rms_norm(x, self.weight, self.eps)
        return self.elementwise_ops.add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_ops: AttentionOps, ops: ElementwiseOps):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = _head_dim(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias, o_bias = _attention_biases(config)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.attn_ops = attn_ops
        self.elementwise_ops = ops

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        qk_size = self.q_size + self.kv_size
        # q and k rotated as one [T, heads + kv_heads, head_dim] view of qkv (in place where the op
        # can: qkv is this call's own): one op per layer, and the attention kernels take q and k
        # with a token stride.
        qk = self.elementwise_ops.rotary(qkv[:, :qk_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        self.attn_ops.write_kv(k, v, k_cache, v_cache, attn.slot_mapping)
        out = self.attn_ops.paged_attention(
            q,
            k_cache,
            v_cache,
            attn.block_tables,
            attn.seq_lens,
            attn.cu_seqlens_q,
            self.scale,
            query_lens_cpu=attn.query_lens_cpu,
            seq_lens_cpu=attn.seq_lens_cpu,
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: ElementwiseOps):
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported")
        bias = getattr(config, "mlp_bias", False)
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.elementwise_ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.elementwise_ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_ops: AttentionOps, ops: ElementwiseOps):
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_ops, ops)
        self.mlp = LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the caller's next norm adds
        the two. `residual` is None for the first layer, whose input is the embedding alone."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, kv_cache, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, attn_ops: AttentionOps, ops: ElementwiseOps):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config, _head_dim(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_ops, ops) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache, attn)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a paged KV cache.

    `attn_ops` supplies `write_kv` and `paged_attention` (default: the torch reference kernels);
    `elementwise_ops` the norms, SiLU-and-mul and rotary (default: torch; see
    `use_elementwise_ops` for a built model).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        attn_ops: AttentionOps | None = None,
        elementwise_ops: ElementwiseOps | None = None,
    ):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.model = LlamaModel(config, attn_ops or AttentionOps(), elementwise_ops or ElementwiseOps())
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return _head_dim(self.config)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states `[T, hidden]` of the batch; writes its K/V into `kv_caches`."""
        return self.model(input_ids, positions, kv_caches, attn)

    def use_elementwise_ops(self, ops: ElementwiseOps) -> None:
        """Route every norm, MLP activation and rotary of this (built, maybe sharded) model through
        `ops`."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaAttention, LlamaMLP)):
                module.elementwise_ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits `[N, vocab]` for the rows of `hidden` that are sampled."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; each must come once."""
        targets = self._hf_targets()
        seen: set[str] = set()
        unknown: list[str] = []
        for name, tensor in weights:
            if name not in targets:
                if not _ignorable(name, self.tie_word_embeddings):
                    unknown.append(name)
                continue
            param, start = targets[name]
            target = param.data if start is None else param.data.narrow(0, start, tensor.shape[0])
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add(name)
        missing = sorted(set(targets) - seen)
        if unknown or missing:
            raise ValueError(
                f"weights do not match the model: unknown {sorted(unknown)}, missing {missing}"
            )

    def _hf_targets(self) -> dict[str, tuple[nn.Parameter, int | None]]:
        """Hugging Face name -> (our parameter, row offset in a fused parameter or None)."""
        targets: dict[str, tuple[nn.Parameter, int | None]] = {
            "model.embed_tokens.weight": (self.model.embed_tokens.weight, None),
            "model.norm.weight": (self.model.norm.weight, None),
        }
        if not self.tie_word_embeddings:
            targets["lm_head.weight"] = (self.lm_head.weight, None)
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            fused = {
                "self_attn.q_proj": (attn.qkv_proj, 0),
                "self_attn.k_proj": (attn.qkv_proj, attn.q_size),
                "self_attn.v_proj": (attn.qkv_proj, attn.q_size + attn.kv_size),
                "self_attn.o_proj": (attn.o_proj, None),
                "mlp.gate_proj": (mlp.gate_up_proj, 0),
                "mlp.up_proj": (mlp.gate_up_proj, mlp.intermediate_size),
                "mlp.down_proj": (mlp.down_proj, None),
            }
            for hf_name, (linear, start) in fused.items():
                targets[f"{prefix}.{hf_name}.weight"] = (linear.weight, start)
                if linear.bias is not None:
                    targets[f"{prefix}.{hf_name}.bias"] = (linear.bias, start)
            targets[f"{prefix}.input_layernorm.weight"] = (layer.input_layernorm.weight, None)
            targets[f"{prefix}.post_attention_layernorm.weight"] = (
                layer.post_attention_layernorm.weight,
                None,
            )
        return targets


def _ignorable(name: str, tied: bool) -> bool:
    # Old checkpoints store rotary buffers; some tied checkpoints still carry a copy of lm_head.
    return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias): Qwen2 biases q/k/v only; Llama's `attention_bias` all four."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_type" not in params and "type" in params:
        params = {**params, "rope_type": params["type"]}
    return params


def _default_inv_freq(config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    params = _rope_parameters(config)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
    return 1.0 / (base**exponents)


def _check_supported(config: PretrainedConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model_type {config.model_type!r} is not supported "
            f"(supported: {SUPPORTED_MODEL_TYPES})"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise NotImplementedError(
            f"sliding window attention ({window} < max_position_embeddings "
            f"{config.max_position_embeddings}) is not supported"
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise NotImplementedError("sliding window attention layers are not supported")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
