"""The C++ elementwise kernels (kernels/cpu/elementwise*) against the model's torch ops, on every ISA
this CPU runs; then whole models (single rank and tensor-parallel) with them against without.

The oracle is the torch side of `ElementwiseOps` in worker_svc/models/llama.py (which
tests/test_llama_model.py holds to Hugging Face). Fresh seeds, NaN-poisoned outputs, odd sizes
(vector tails), strided rows.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.cpu_ops import build_directory, build_extension
from tests.test_llama_model import PagedRunner, tiny_config
from tests.test_tensor_parallel import CASES, build_model, generate, run_ranks
from tests.test_tensor_parallel import tiny_config as tp_tiny_config
from worker_svc.cpu_fused_ops import CpuElementwise, load_cpu_elementwise, use_fused_cpu_ops
from worker_svc.models.llama import (
    ElementwiseOps,
    LlamaForCausalLM,
    add_rms_norm,
    apply_rotary,
    rms_norm,
    silu_and_mul,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN = [576, 64, 65, 1000]
TOKENS = [1, 7, 33]
# float32 rounding: the mean of squares is summed in another order and SiLU's exp is not Sleef's.
RTOL, ATOL = 1e-6, 1e-7


@pytest.fixture(scope="module")
def library():
    build_extension()  # registers torch.ops.omnibus_cpu_elementwise
    return torch.ops.omnibus_cpu_elementwise


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def isa(request, library) -> str:
    if request.param not in library.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return request.param


def strided_rows(tokens: int, features: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A `[tokens, features]` view whose rows are further apart than `features`."""
    wide = torch.randn(tokens, features + 13, generator=generator) * scale
    return wide[:, 5 : 5 + features]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, float("nan"))


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("strided", [False, True])
def test_fused_add_rms_norm_matches_torch(library, isa, seed, hidden, tokens, strided):
    generator = torch.Generator().manual_seed(seed)
    make = (lambda: strided_rows(tokens, hidden, generator, 3.0)) if strided else (
        lambda: torch.randn(tokens, hidden, generator=generator) * 3)
    x, residual = make(), make()
    weight = torch.randn(hidden, generator=generator)
    expected, expected_residual = add_rms_norm(x, residual, weight, 1e-5)
    library.fused_add_rms_norm(x, residual, weight, 1e-5, isa)
    assert torch.equal(residual, expected_residual)  # one addition: torch's bits
    torch.testing.assert_close(x, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_torch(library, isa, seed, hidden, tokens):
    generator = torch.Generator().manual_seed(seed)
    x = strided_rows(tokens, hidden, generator, 3.0)
    weight = torch.randn(hidden, generator=generator)
    out = nan_like(x)
    library.rms_norm(out, x, weight, 1e-6, isa)
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-6), rtol=RTOL, atol=ATOL)
    in_place = x.clone()
    library.rms_norm(in_place, in_place, weight, 1e-6, isa)  # out may be x itself
    assert torch.equal(in_place, out)


@pytest.mark.parametrize("intermediate", HIDDEN + [1])
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_matches_torch(library, isa, seed, intermediate, tokens):
    generator = torch.Generator().manual_seed(seed)
    gate_up = strided_rows(tokens, 2 * intermediate, generator, 4.0)
    out = nan_like(gate_up[:, :intermediate])
    library.silu_and_mul(out, gate_up, isa)
    torch.testing.assert_close(out, silu_and_mul(gate_up), rtol=RTOL, atol=ATOL)


def test_silu_and_mul_at_the_edges_of_exp(library, isa):
    gate = torch.tensor([-200.0, -104.0, -100.0, -88.8, -88.7, -87.5, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.7,
                         88.8, 200.0, float("inf"), float("-inf"), float("nan")])
    gate_up = torch.cat([gate, torch.linspace(-2, 2, gate.numel())])[None]
    out = nan_like(gate[None])
    library.silu_and_mul(out, gate_up, isa)
    torch.testing.assert_close(out, silu_and_mul(gate_up), rtol=RTOL, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("head_dim", [64, 128, 18, 2])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary_matches_torch_in_place_on_a_fused_qkv(library, isa, seed, head_dim, tokens):
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = 9, 3
    qk_size = (num_heads + num_kv_heads) * head_dim
    qkv = torch.randn(tokens, qk_size + num_kv_heads * head_dim, generator=generator)
    positions = torch.randint(0, 4096, (tokens,), generator=generator).float()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1  # scaled, as yarn's attention_scaling does
    before = qkv.clone()
    qk = qkv[:, :qk_size].view(tokens, -1, head_dim)  # token stride > heads * head_dim
    expected = apply_rotary(qk, cos, sin)
    library.rotary_neox(qk, cos, sin, isa)
    torch.testing.assert_close(qk, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(qkv[:, qk_size:], before[:, qk_size:]), "v was touched"


def test_rotary_takes_a_head_stride(library, isa, seed):
    generator = torch.Generator().manual_seed(seed)
    padded = torch.randn(5, 4, 96, generator=generator)
    x = padded[..., :64]  # head stride 96
    cos, sin = torch.randn(5, 64, generator=generator), torch.randn(5, 64, generator=generator)
    expected, tail = apply_rotary(x, cos, sin), padded[..., 64:].clone()
    library.rotary_neox(x, cos, sin, isa)
    torch.testing.assert_close(x, expected, rtol=RTOL, atol=ATOL)
    assert torch.equal(padded[..., 64:], tail)


# Vector tails of both widths, a decode batch's vocabulary, one past 2^16.
ARGMAX_COLUMNS = [1, 7, 15, 16, 17, 33, 49152, 65537]


def kernel_argmax(library, isa: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0],), -7, dtype=torch.int64)  # poisoned: every row must be written
    library.argmax_rows(out, x, isa)
    return out


@pytest.mark.parametrize("columns", ARGMAX_COLUMNS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("values", ["normal", "few distinct", "strided"])
def test_argmax_matches_torch(library, isa, seed, columns, tokens, values):
    """"few distinct": small integers, so every row holds its maximum many times over lanes and the
    tail, and the first of them must win."""
    generator = torch.Generator().manual_seed(seed)
    if values == "few distinct":
        x = torch.randint(-3, 3, (tokens, columns), generator=generator).float()
    elif values == "strided":
        x = strided_rows(tokens, columns, generator)
    else:
        x = torch.randn(tokens, columns, generator=generator)
    assert torch.equal(kernel_argmax(library, isa, x), x.argmax(dim=-1))


def test_argmax_ranks_nan_infinities_and_signed_zeros_as_torch(library, isa, seed):
    inf, nan = float("inf"), float("nan")
    generator = torch.Generator().manual_seed(seed)
    columns = 100
    position = lambda: int(torch.randint(columns, (1,), generator=generator))  # noqa: E731
    rows = []
    for fill, marks in [
        (-inf, []),  # nothing beats -inf: the first
        (0.0, []),  # all equal
        (-1.0, [(position(), inf), (position(), inf)]),
        (-1.0, [(position(), -0.0), (position(), 0.0)]),  # -0.0 == 0.0: the first of the two
        (0.0, [(position(), nan)]),
        (0.0, [(position(), inf), (position(), nan), (position(), nan)]),  # the first NaN, past any inf
        (-inf, [(columns - 1, -3.0)]),  # the maximum in the vector tail alone
        (nan, []),
    ]:
        row = torch.full((columns,), fill)
        for index, value in marks:
            row[index] = value
        rows.append(row)
    x = torch.stack(rows)
    assert torch.equal(kernel_argmax(library, isa, x), x.argmax(dim=-1))


def test_sampler_with_the_kernel_argmax_draws_torchs_tokens(library, isa, seed):
    """Greedy rows and the exponential race (seeded and unseeded rows) pick the same tokens."""
    from scheduler_svc.protocol import SamplingOptions
    from worker_svc.sampler import Sampler

    logits = torch.randn(6, 4099, generator=torch.Generator().manual_seed(seed)) * 3
    options = [SamplingOptions(), SamplingOptions(temperature=0.8, seed=seed),
               SamplingOptions(temperature=1.2, top_k=50), SamplingOptions(temperature=0.7, top_p=0.9),
               SamplingOptions(), SamplingOptions(temperature=1.0, min_p=0.05)]
    positions = list(range(6))
    kernel = CpuElementwise(isa).argmax
    for batch in (options, options[:1] + options[4:5]):
        rows = logits[: len(batch)]
        ours = Sampler("cpu", seed=seed, argmax=kernel).sample(rows, batch, positions)
        expected = Sampler("cpu", seed=seed).sample(rows, batch, positions)
        assert torch.equal(ours, expected)


def test_argmax_leaves_to_torch_what_the_kernel_does_not_take(library):
    argmax = CpuElementwise(library.supported_isas()[0]).argmax
    x = torch.randn(5, 40)
    for other in (x.double(), x.t(), x[0], torch.empty(3, 0)):
        if other.numel() == 0:
            with pytest.raises((RuntimeError, IndexError)):
                argmax(other)
            continue
        assert torch.equal(argmax(other), other.argmax(dim=-1))


def test_bad_inputs_are_rejected(library):
    x, residual, weight = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    with pytest.raises(RuntimeError, match="float32"):
        library.fused_add_rms_norm(x.bfloat16(), residual.bfloat16(), weight, 1e-5)
    with pytest.raises(RuntimeError, match="same shape"):
        library.fused_add_rms_norm(x, residual[:2], weight, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        library.rms_norm(torch.empty(3, 64), x, weight[:63], 1e-5)
    with pytest.raises(RuntimeError, match="single memory location"):
        library.fused_add_rms_norm(x, x, weight, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous features"):
        library.rms_norm(torch.empty(3, 64), x.t().contiguous().t(), weight, 1e-5)
    with pytest.raises(RuntimeError, match="2 \\* I"):
        library.silu_and_mul(torch.empty(3, 20), torch.randn(3, 64))
    with pytest.raises(RuntimeError, match="even"):
        library.rotary_neox(torch.randn(3, 2, 7), torch.randn(3, 7), torch.randn(3, 7))
    with pytest.raises(RuntimeError, match="unknown isa"):
        library.rms_norm(torch.empty(3, 64), x, weight, 1e-5, "sse2")
    with pytest.raises(RuntimeError, match="int64"):
        library.argmax_rows(torch.empty(3, dtype=torch.int32), x)
    with pytest.raises(RuntimeError, match="one element per row"):
        library.argmax_rows(torch.empty(2, dtype=torch.int64), x)
    with pytest.raises(RuntimeError, match="columns"):
        library.argmax_rows(torch.empty(3, dtype=torch.int64), torch.empty(3, 0))


def test_empty_batch_is_a_no_op(library):
    x, residual = torch.empty(0, 64), torch.empty(0, 64)
    library.fused_add_rms_norm(x, residual, torch.randn(64), 1e-5)
    library.rotary_neox(torch.empty(0, 3, 64), torch.empty(0, 64), torch.empty(0, 64))


def test_a_second_build_loaded_in_one_process_keeps_the_first_builds_ops(library, tmp_path):
    """Another copy of the extension loaded later (sources edited while a worker or a test session
    runs, another cache directory) must neither abort the process nor lose the ops."""
    shutil.copytree(build_directory(), tmp_path / build_directory().name)
    script = "\n".join([
        "import os, torch",
        "from kernels.cpu_ops import build_directory, build_extension",
        "build_extension()",
        f"os.environ['OMNIBUS_KERNEL_CACHE_DIR'] = {str(tmp_path)!r}",
        "assert build_directory().is_relative_to(os.environ['OMNIBUS_KERNEL_CACHE_DIR'])",
        "build_extension()",
        "x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)",
        "torch.ops.omnibus_cpu_elementwise.fused_add_rms_norm(x, r, w, 1e-5)",
        "print(list(torch.ops.omnibus_cpu_elementwise.supported_isas()))",
    ])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "avx" in run.stdout


def random_model(name: str, seed: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(tiny_config(name))
    generator = torch.Generator().manual_seed(seed)
    for param_name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.1
        param.data.copy_(1.0 + noise if param_name.endswith("norm.weight") else noise)
    return model.eval()


@pytest.mark.parametrize("name", ["qwen2-untied", "llama-biases", "mistral", "yarn-rope"])
def test_model_with_the_kernels_matches_the_torch_ops(library, isa, seed, name):
    """Chunked prefill then a decode, on configs whose head_dim (16, 24) leaves vector tails."""
    random.seed(seed)
    reference, fused = random_model(name, seed), random_model(name, seed)
    assert use_fused_cpu_ops(fused, isa) == isa
    assert all(m.elementwise_ops.rms_norm.__self__.isa == isa
               for m in fused.modules() if hasattr(m, "elementwise_ops"))
    runners = [PagedRunner(model, block_size=4, num_blocks=80) for model in (reference, fused)]
    for runner in runners:
        runner.free_blocks = list(range(80))  # the same blocks for both
    tokens = {n: random.choices(range(211), k=k) for n, k in [("x", 40), ("y", 9)]}
    for plan in ({"x": (tokens["x"][:30], 0), "y": (tokens["y"], 0)},
                 {"x": (tokens["x"], 30), "y": (tokens["y"] + [7], 9)}):
        expected, ours = (runner.step(plan) for runner in runners)
        for n in plan:
            torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-4)


def test_models_the_kernels_cannot_run_keep_the_torch_ops(library):
    model = random_model("mistral", 0).to(torch.bfloat16)
    kernels, why_not = load_cpu_elementwise(model)
    assert kernels is None and "bfloat16" in why_not
    assert use_fused_cpu_ops(model) is None
    assert all(m.elementwise_ops == ElementwiseOps() for m in model.modules() if hasattr(m, "elementwise_ops"))
    with pytest.raises(ValueError, match="not supported"):
        load_cpu_elementwise(random_model("mistral", 0), isa="neon")


def test_kernel_ops_have_the_torch_signatures(library):
    ops = CpuElementwise(library.supported_isas()[0]).ops()
    generator = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(4, 64, generator=generator) for _ in range(3))
    weight = weight[0]
    expected = ElementwiseOps().add_rms_norm(x, residual, weight, 1e-5)
    normed, new_residual = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    torch.testing.assert_close(normed, expected[0], rtol=RTOL, atol=ATOL)
    assert torch.equal(new_residual, expected[1])
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), rtol=RTOL, atol=ATOL)
    gate_up = torch.randn(4, 128, generator=generator)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), silu_and_mul(gate_up), rtol=RTOL, atol=ATOL)


def test_sharded_ranks_with_the_kernels_match_the_unsharded_torch_model(library, seed, tmp_path):
    """Row-parallel o_proj/down_proj (all-reduce, then bias) feed the fused residual add."""
    world_size, overrides = CASES["tp2-8q-2kv-biases"]
    first = run_ranks(world_size, overrides, seed, tmp_path, fused_ops=True)[0]
    reference = generate(build_model(tp_tiny_config(overrides), seed), overrides["num_key_value_heads"], seed)
    assert first["tokens"] == reference.tokens
    for step, (ours, expected) in enumerate(zip(first["logits"], reference.logits, strict=True)):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")
