"""The small-batch block-quantized matrix product (kernels/cpu/block_linear*, worker_svc/cpu_block_linear.py).

Weights are made the way llama.cpp's quantizers make Q4_1 and Q8_0 blocks and then dequantized,
as the model loader does; the kernel must match `x @ w.T` computed in float64 on every ISA this CPU
runs (fresh seeds, vector and group tails, strided rows), and the recovered blocks must give the
float32 weights back bit for bit, or not be used at all.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kernels.cpu_ops import build_extension
from tests.test_cpu_elementwise import random_model
from worker_svc.cpu_block_linear import (
    MAX_BLOCK_ROWS,
    Q4_1,
    Q8_0,
    BlockLinear,
    BlockWeights,
    exact_blocks,
    use_block_weights,
)
from worker_svc.cpu_linear import PackedLinear, pack_linears
from worker_svc.models.llama import Linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KERNEL_ROWS = 16  # kernels/cpu/block_linear.h kMaxBlockRows


@pytest.fixture(scope="module")
def extension():
    return build_extension()


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def isa(request, extension) -> str:
    if request.param not in extension.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return request.param


def llama_cpp_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized as ggml's quantize_row_q4_1 does, then dequantized in float32."""
    blocks = weight.reshape(weight.shape[0], -1, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (high - low) / 15
    inverse = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    q = ((blocks - low) * inverse + 0.5).floor().clamp(max=15)
    return (d.half().float() * q + low.half().float()).reshape(weight.shape)


def llama_cpp_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized as ggml's quantize_row_q8_0 does, then dequantized in float32."""
    blocks = weight.reshape(weight.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    q = (blocks * inverse).round()
    return (d.half().float() * q).reshape(weight.shape)


def random_blocks(fmt: int, out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    return llama_cpp_q4_1(weight) if fmt == Q4_1 else llama_cpp_q8_0(weight)


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
def test_blocks_are_recovered_bit_for_bit(seed, fmt):
    generator = torch.Generator().manual_seed(seed)
    weight = random_blocks(fmt, 70, 96, generator)
    weight[3, 32:64] = 0.25  # a constant block: d = 0 (Q4_1) or a single value (Q8_0)
    weight[4, :32] = 0.0
    if fmt == Q8_0:
        weight[3, 32:64] = llama_cpp_q8_0(weight[3:4])[0, 32:64]
    blocks = exact_blocks(weight)
    assert blocks is not None and blocks.format == fmt
    assert torch.equal(blocks.dequantize(), weight)


def test_weights_that_are_not_blocks_stay_dense(seed):
    generator = torch.Generator().manual_seed(seed)
    assert exact_blocks(torch.randn(8, 64, generator=generator)) is None  # a float32 checkpoint
    assert exact_blocks(random_blocks(Q4_1, 8, 64, generator)[:, 16:48]) is None  # k-sliced through blocks
    assert exact_blocks(torch.randn(8, 40, generator=generator)) is None  # in_features not a multiple of 32
    almost = random_blocks(Q4_1, 8, 64, generator)
    almost[5, 7] = torch.nextafter(almost[5, 7], torch.tensor(1.0))  # one weight off by an ulp
    assert exact_blocks(almost) is None
    poisoned = random_blocks(Q8_0, 8, 64, generator)
    poisoned[0, 0] = float("nan")
    assert exact_blocks(poisoned) is None
    assert exact_blocks(torch.randn(8, 64, generator=generator).double()) is None
    for shape in [(64,), (2, 4, 32), (0, 32)]:  # not a matrix, or an empty one
        assert exact_blocks(torch.zeros(shape)) is None


def test_near_constant_blocks_whose_scale_underflows_are_refused(seed):
    """(max - min) / 15 below float16's smallest subnormal rounds d to 0: not Q4_1 blocks."""
    weight = torch.zeros(2, 32)
    weight[1, 5] = 1e-9
    assert exact_blocks(weight[:1]) is not None  # all-zero: d = 0 is exact
    assert exact_blocks(weight) is None


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 12, KERNEL_ROWS])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (129, 576), (576, 1536)])
def test_kernel_matches_float64(extension, isa, seed, fmt, rows, shape):
    """Output counts that leave group tails (1, 7, 129); strided rows of x; with and without bias."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(seed)
    weight = random_blocks(fmt, out_features, in_features, generator)
    blocks = exact_blocks(weight)
    assert blocks is not None and blocks.format == fmt
    x = torch.randn(rows, in_features + 5, generator=generator)[:, 3 : 3 + in_features]
    for bias in (None, torch.randn(out_features, generator=generator)):
        y = extension.block_linear(x, blocks.q, blocks.scale, blocks.min, bias, blocks.format, isa)
        expected = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
        torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=2e-6 * in_features**0.5)


def test_kernel_rejects_bad_inputs(extension):
    generator = torch.Generator().manual_seed(0)
    blocks = exact_blocks(random_blocks(Q4_1, 16, 64, generator))
    q8 = exact_blocks(random_blocks(Q8_0, 16, 64, generator))
    x = torch.randn(2, 64)

    def call(x=x, q=blocks.q, scale=blocks.scale, low=blocks.min, bias=None, fmt=Q4_1):
        return extension.block_linear(x, q, scale, low, bias, fmt, "")

    for kwargs, message in [
        ({"x": torch.randn(0, 64)}, "1 to 16 rows"),
        ({"x": torch.randn(KERNEL_ROWS + 1, 64)}, "1 to 16 rows"),
        ({"x": torch.randn(2, 64).double()}, "float32"),
        ({"x": torch.randn(64, 2).t()}, "contiguous features"),
        ({"x": torch.randn(2, 48), "q": blocks.q[:, :24]}, "multiple of 32"),
        ({"q": blocks.q.view(torch.int8)}, "uint8"),
        ({"q": blocks.q[:, :16]}, "uint8"),
        ({"scale": blocks.scale[:, :1]}, "scale"),
        ({"low": None}, "needs min"),
        ({"q": q8.q, "scale": q8.scale, "fmt": Q8_0}, "takes no min"),
        ({"bias": torch.randn(15)}, "bias"),
        ({"fmt": 2}, "format"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    with pytest.raises(RuntimeError, match="unknown isa"):
        extension.block_linear(x, blocks.q, blocks.scale, blocks.min, None, Q4_1, "sse2")


@pytest.mark.parametrize("pack", [False, True])
def test_block_linear_runs_small_batches_on_blocks_and_large_ones_dense(extension, seed, pack):
    generator = torch.Generator().manual_seed(seed)
    dense = Linear(64, 40, bias=True)
    dense.weight.data.copy_(random_blocks(Q4_1, 40, 64, generator))
    dense.bias.data.normal_(generator=generator)
    layer = BlockLinear(dense, exact_blocks(dense.weight), extension, extension.supported_isas()[0])
    holder = torch.nn.Module()
    holder.layer = layer
    if pack:
        assert pack_linears(holder) == 1 and isinstance(layer.dense, PackedLinear)
    calls = []
    real = extension.block_linear

    class Spy:
        def block_linear(self, *args):
            calls.append((args[0].shape[0], args[-1]))
            return real(*args)

    layer.extension = Spy()
    layer.isa = "avx2" if "avx2" in extension.supported_isas() else layer.isa
    for rows in (0, 1, MAX_BLOCK_ROWS, MAX_BLOCK_ROWS + 1, 40):
        x = torch.randn(rows, 64, generator=generator)
        expected = x.double() @ dense.weight.double().t() + dense.bias.double() if not pack else None
        y = layer(x)
        if expected is not None:
            torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)
        assert y.shape == (rows, 40)
    assert calls == [(1, layer.isa), (MAX_BLOCK_ROWS, layer.isa)]
    # The blocks are derived from the weights, not checkpoint state.
    assert set(layer.state_dict()) == {f"dense.{name}" for name in layer.dense.state_dict()}


def exact_block_model(name: str, seed: int):
    """A random tiny model whose linears are Q4_1 and embedding Q8_0 blocks, as a GGUF's are."""
    model = random_model(name, seed)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.shape[1] % 32 == 0:
            module.weight.data.copy_(random_blocks(Q4_1, *module.weight.shape, generator))
    embedding = model.model.embed_tokens.weight
    if embedding.shape[1] % 32 == 0:
        embedding.data.copy_(llama_cpp_q8_0(embedding.data))
    return model


def test_use_block_weights_wraps_exactly_the_linears_that_are_blocks(extension, seed, caplog):
    model = exact_block_model("qwen2-untied", seed)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    aligned = sum(m.weight.shape[1] % 32 == 0 for m in linears)
    assert 0 < aligned
    with caplog.at_level(logging.INFO, logger="worker_svc.cpu_block_linear"):
        assert use_block_weights(model, extension.supported_isas()[0]) == (aligned, len(linears))
    assert f"block weights: {aligned} of {len(linears)} linears run batches of up to {MAX_BLOCK_ROWS} rows" \
        in caplog.text
    plain = random_model("qwen2-untied", seed)
    assert use_block_weights(plain, extension.supported_isas()[0]) == (0, len(linears))


@pytest.mark.parametrize("name", ["qwen2-untied", "llama-biases"])
def test_model_on_block_weights_matches_the_dense_model(extension, seed, name):
    """Prefill (more rows than the kernel takes) then decode rows (fewer), through the paged model."""
    import random

    from tests.test_llama_model import PagedRunner

    random.seed(seed)
    reference, blocked = exact_block_model(name, seed), exact_block_model(name, seed)
    wrapped, _ = use_block_weights(blocked, extension.supported_isas()[0])
    assert wrapped > 0
    pack_linears(blocked)
    runners = [PagedRunner(model, block_size=4, num_blocks=80) for model in (reference, blocked)]
    for runner in runners:
        runner.free_blocks = list(range(80))
    tokens = {n: random.choices(range(211), k=k) for n, k in [("x", 40), ("y", 9)]}
    for plan in ({"x": (tokens["x"][:30], 0), "y": (tokens["y"], 0)},
                 {"x": (tokens["x"], 30), "y": (tokens["y"] + [7], 9)},
                 {"x": (tokens["x"] + [3], 40), "y": (tokens["y"] + [7, 8], 10)}):
        expected, ours = (runner.step(plan) for runner in runners)
        for n in plan:
            torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-4)


def test_block_weights_describe_their_shapes():
    blocks = exact_blocks(llama_cpp_q4_1(torch.randn(3, 64)))
    assert isinstance(blocks, BlockWeights)
    assert blocks.q.shape == (3, 32) and blocks.q.dtype == torch.uint8
    assert blocks.scale.shape == blocks.min.shape == (3, 2)
