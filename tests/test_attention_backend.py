"""The worker picks its attention and matrix-product implementations explicitly.

On a CPU `auto` means our C++ kernels and oneDNN-prepacked linears, with the plain torch
implementations as the fallback; unverified CUDA kernels stay opt-in.
"""

import logging

import pytest
import torch

from kernels import cpu_ops, reference
from worker_svc.cpu_linear import PackedLinear, pack_linears, resolve_linear_backend
from worker_svc.models.llama import Linear
from worker_svc.worker import WorkerConfig, attention_ops, resolve_kv_cache_dtype


def test_torch_backend_is_the_reference():
    ops = attention_ops("torch", torch.device("cpu"))
    assert ops.paged_attention is reference.paged_attention and ops.write_kv is reference.write_kv


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_auto_and_cpu_use_the_cpu_kernels_on_cpu(backend):
    ops = attention_ops(backend, torch.device("cpu"))
    assert isinstance(ops.paged_attention.__self__, cpu_ops.CpuAttention)
    assert isinstance(ops.write_kv.__self__, cpu_ops.CpuAttention)


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ops, "load_cpu_attention", lambda isa=None: (None, "no C++ compiler"))
    with caplog.at_level(logging.WARNING):
        ops = attention_ops("auto", torch.device("cpu"))
    assert ops.paged_attention is reference.paged_attention
    assert "no C++ compiler" in caplog.text
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        attention_ops("cpu", torch.device("cpu"))


def test_a_failed_build_is_reported_not_raised(monkeypatch):
    def no_compiler(verbose=False):
        raise OSError("g++: not found")

    monkeypatch.setattr(cpu_ops, "build_extension", no_compiler)
    kernels, why_not = cpu_ops.load_cpu_attention()
    assert kernels is None and "g++: not found" in why_not


def test_cuda_backend_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention_ops("cuda", torch.device("cpu"))


def test_config_rejects_unknown_backends_and_a_group_without_rendezvous():
    with pytest.raises(ValueError, match="attention_backend"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", attention_backend="triton")
    with pytest.raises(ValueError, match="linear_backend"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", linear_backend="mkl")
    with pytest.raises(ValueError, match="needs a dist_init_method"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", world_size=2, rank=1)
    with pytest.raises(ValueError, match="dist_backend"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", world_size=2, rank=1, dist_init_method="env://",
                     dist_backend="mpi")
    WorkerConfig(scheduler="tcp://127.0.0.1:1", world_size=2, rank=1, dist_init_method="tcp://127.0.0.1:2")


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Linear(24, 40, bias=True)
        self.b = Linear(40, 8)
        for p in self.parameters():
            p.data.normal_()

    def forward(self, x):
        return self.b(self.a(x))


def test_linear_backend_resolution():
    model = TwoLinears()
    assert resolve_linear_backend("auto", model, block_kernels=True) == "blocks"
    assert resolve_linear_backend("auto", model, block_kernels=False) == "onednn"
    assert resolve_linear_backend("blocks", model, block_kernels=True) == "blocks"
    assert resolve_linear_backend("onednn", model, block_kernels=True) == "onednn"
    assert resolve_linear_backend("torch", model, block_kernels=True) == "torch"
    assert resolve_linear_backend("auto", model.to(torch.bfloat16), block_kernels=True) == "torch"
    with pytest.raises(ValueError, match="C\\+\\+ CPU kernels"):
        resolve_linear_backend("blocks", model.float(), block_kernels=False)
    for backend in ("onednn", "blocks"):
        with pytest.raises(ValueError, match="float32 CPU model"):
            resolve_linear_backend(backend, model.to(torch.bfloat16), block_kernels=True)


@pytest.mark.parametrize("rows", [1, 3, 32, 130])
def test_packed_linears_match_f_linear(seed, rows):
    model = TwoLinears()
    x = torch.randn(rows, 24)
    expected = model(x)
    assert pack_linears(model) == 2
    assert isinstance(model.a, PackedLinear) and isinstance(model.b, PackedLinear)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    cpu_ops._remove_stale_lock(tmp_path, max_age_s=600)
    assert lock.exists(), "a build that is running right now keeps its lock"
    old = time.time() - 3600
    os.utime(lock, (old, old))
    cpu_ops._remove_stale_lock(tmp_path, max_age_s=600)
    assert not lock.exists()


def test_a_cached_build_loads_without_the_toolchain(monkeypatch):
    from torch.utils import cpp_extension

    cpu_ops.build_extension()  # make sure this source digest is built

    def no_toolchain(*args, **kwargs):
        raise AssertionError("the toolchain ran although the build is cached")

    monkeypatch.setattr(cpp_extension, "load", no_toolchain)
    assert cpu_ops.CpuAttention(cpu_ops.build_extension()).isa in ("avx512", "avx2")


def test_kv_cache_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_kv_cache_dtype("auto", torch.float32, "auto", cpu) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "auto", cuda) == torch.bfloat16
    assert resolve_kv_cache_dtype("float16", torch.float32, "auto", cpu) == torch.float16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32, "torch", cuda) == torch.bfloat16  # the reference reads any
    assert resolve_kv_cache_dtype("bfloat16", torch.bfloat16, "cuda", cuda) == torch.bfloat16
    with pytest.raises(ValueError, match="needs a float32 model"):
        resolve_kv_cache_dtype("float16", torch.bfloat16, "auto", cpu)
    with pytest.raises(ValueError, match="CUDA kernels read a cache of the model's dtype only"):
        resolve_kv_cache_dtype("float16", torch.float32, "auto", cuda)
    assert resolve_kv_cache_dtype("int8", torch.float32, "cpu", cpu) == torch.int8
    assert resolve_kv_cache_dtype("int8", torch.float32, "torch", cuda) == torch.int8  # the reference dequantizes
    with pytest.raises(ValueError, match="CUDA kernels read a cache of the model's dtype only"):
        resolve_kv_cache_dtype("int8", torch.float32, "cuda", cuda)
    with pytest.raises(ValueError, match="needs a float32 model"):
        resolve_kv_cache_dtype("int8", torch.bfloat16, "torch", cpu)
    with pytest.raises(ValueError, match="kv_cache_dtype 'int4'"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", dtype="int8")  # a cache type only
