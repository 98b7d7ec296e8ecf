"""The worker picks its attention implementation explicitly; unverified CUDA kernels are opt-in."""

import pytest
import torch

from kernels import reference
from worker_svc.worker import WorkerConfig, attention_ops


def test_auto_and_torch_use_the_reference_on_cpu():
    for backend in ("auto", "torch"):
        ops = attention_ops(backend, torch.device("cpu"))
        assert ops.paged_attention is reference.paged_attention and ops.write_kv is reference.write_kv


def test_cuda_backend_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention_ops("cuda", torch.device("cpu"))


def test_config_rejects_unknown_backend_and_tensor_parallelism():
    with pytest.raises(ValueError, match="attention_backend"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", attention_backend="triton")
    with pytest.raises(ValueError, match="tensor parallelism"):
        WorkerConfig(scheduler="tcp://127.0.0.1:1", world_size=2, rank=1)
