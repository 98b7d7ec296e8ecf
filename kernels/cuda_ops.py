"""CuPy loader and torch-facing wrappers for the paged-attention CUDA kernels.

`write_kv` and `paged_attention` take the same arguments as their torch references in
`kernels.reference`, so `AttentionOps(write_kv=..., paged_attention=...)` can hold either. Kernels
run on torch's current stream through raw pointers; nothing here synchronises with the host. Each
(kernel file, dtype, head_dim, block_size, group bucket) is compiled on first use; CuPy keeps the
binaries in its on-disk kernel cache, so later processes load them without compiling.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kernels import launch_plan as lp

KERNEL_DIR = Path(__file__).resolve().parent
LOG2E = 1.4426950408889634


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _host_max(values) -> int:
    return int(values.max()) if hasattr(values, "max") else int(max(values))


@functools.cache
def _cuda_include_dirs() -> tuple[str, ...]:
    """CUDA's header folder, for cuda_fp16.h / cuda_bf16.h under NVRTC (CuPy usually adds it too)."""
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_bf16.h").is_file():
            return (f"-I{Path(root) / 'include'}",)
    return ()


@functools.cache
def _source(name: str) -> str:
    # CuPy's cache key covers the code and options, not included headers: fold the header's
    # digest into the code so an edit to common.cuh recompiles.
    header = (KERNEL_DIR / "common.cuh").read_bytes()
    digest = hashlib.sha1(header).hexdigest()
    return f"// common.cuh sha1 {digest}\n" + (KERNEL_DIR / name).read_text()


class CudaAttention:
    """Compiled-kernel cache plus the two attention ops for one process."""

    def __init__(self, backend: str | None = None) -> None:
        # "nvrtc" (CuPy's default) or "nvcc"; None tries NVRTC, then nvcc if NVRTC fails.
        self._backend = backend or os.environ.get("OMNIBUS_CUPY_BACKEND")
        self._functions: dict[tuple, object] = {}
        self._num_sms: dict[int, int] = {}

    # -- compilation -------------------------------------------------------------------------

    def _function(self, source: str, name: str, defines: tuple[str, ...] = ()):
        key = (source, name, defines)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._compile(source, defines).get_function(name)
            self._functions[key] = fn
        return fn

    def _compile(self, source: str, defines: tuple[str, ...]):
        import cupy

        options = ("-std=c++17", f"-I{KERNEL_DIR}", *defines)
        backends = [self._backend] if self._backend else ["nvrtc", "nvcc"]
        errors = []
        for backend in backends:
            extra = _cuda_include_dirs() if backend == "nvrtc" else ()
            try:
                module = cupy.RawModule(code=_source(source), options=options + extra, backend=backend)
                module.compile()
                return module
            except Exception as exc:  # CompileException, or nvcc missing on PATH
                errors.append(f"[{backend}] {exc}")
        raise RuntimeError(f"compiling {source} {defines} failed:\n" + "\n".join(errors))

    def _sm_count(self, device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]

    @staticmethod
    def _launch(fn, device: torch.device, grid, block, args) -> None:
        import cupy

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index)
        with cupy.cuda.Device(device.index), stream:
            fn(grid, block, args)

    # -- ops ---------------------------------------------------------------------------------

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store key/value `[num_tokens, num_kv_heads, head_dim]` at their slots; slots < 0 are skipped."""
        row_bytes = lp.check_write_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
        _require_cuda(key)
        num_tokens = key.shape[0]
        if num_tokens == 0:
            return
        esize = key.element_size()
        key_stride, value_stride = key.stride(0) * esize, value.stride(0) * esize
        name, threads = lp.plan_write_kv(
            row_bytes, (key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), key_stride, value_stride)
        )
        fn = self._function("kv_write.cu", name)
        args = (
            _ptr(key), _ptr(value), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping),
            np.int32(slot_mapping.dtype == torch.int64), np.int64(key_stride), np.int64(value_stride),
            np.int32(row_bytes),
        )
        self._launch(fn, key.device, (num_tokens, 1, 1), (threads, 1, 1), args)

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        scale: float,
        *,
        query_lens_cpu=None,
        seq_lens_cpu=None,
        out: torch.Tensor | None = None,
        num_splits: int | None = None,
        use_tensor_cores: bool = True,
    ) -> torch.Tensor:
        """Causal attention of a flattened varlen batch over the paged cache; returns `[num_tokens, H, D]`.

        `query_lens_cpu` / `seq_lens_cpu` (host copies, optional) sharpen the launch plan; without
        them every sequence is assumed to have at least one query token, and the context bound is
        the block-table width. `num_splits` forces the decode split count (testing);
        `use_tensor_cores=False` runs prefill rows through the exact one-row-per-CTA kernel.
        """
        shapes = lp.check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q)
        _require_cuda(q)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        else:
            lp.check_out(out, q)
        if shapes.num_tokens == 0 or shapes.num_seqs == 0:
            return out
        if query_lens_cpu is not None:
            max_query_len = _host_max(query_lens_cpu)
            is_decode = max_query_len == 1 and shapes.num_tokens == shapes.num_seqs
        else:
            is_decode = shapes.num_tokens == shapes.num_seqs
            max_query_len = shapes.num_tokens
        if is_decode or not use_tensor_cores:
            max_kv_len = (
                _host_max(seq_lens_cpu) if seq_lens_cpu is not None else shapes.max_blocks_per_seq * shapes.block_size
            )
            self._decode(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                         max_kv_len=max_kv_len, num_splits=num_splits, decode_only=is_decode)
        else:
            self._prefill(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                          max_query_len=max_query_len)
        return out

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out, *,
                max_kv_len: int, num_splits: int | None, decode_only: bool) -> None:
        plan = lp.plan_decode(shapes.num_tokens, shapes.num_kv_heads, max_kv_len, self._sm_count(q.device),
                              num_splits=num_splits)
        defines = lp.compile_defines(q.dtype, shapes.head_dim, shapes.block_size, lp.group_bucket(shapes.group))
        n, h, d = shapes.num_tokens, shapes.num_heads, shapes.head_dim
        if plan.num_splits > 1:
            part_out = torch.empty((plan.num_splits, n, h, d), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((plan.num_splits, n, h), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when there is one split
        args = (
            _ptr(out), _ptr(part_out), _ptr(part_lse), _ptr(q), _ptr(k_cache), _ptr(v_cache),
            _ptr(block_tables), _ptr(seq_lens), _ptr(cu_seqlens_q),
            np.int32(shapes.num_seqs), np.int32(n), np.int32(h), np.int32(shapes.num_kv_heads),
            np.int32(shapes.max_blocks_per_seq), np.int64(q.stride(0)), np.int32(decode_only),
            np.float32(scale * LOG2E), np.int32(plan.partition_size),
        )
        self._launch(self._function("decode.cu", "omnibus_decode", defines), q.device, plan.grid, plan.block, args)
        if plan.num_splits > 1:
            merge = self._function("decode.cu", "omnibus_decode_merge", defines)
            merge_args = (_ptr(out), _ptr(part_out), _ptr(part_lse), np.int32(n), np.int32(h),
                          np.int32(plan.num_splits))
            self._launch(merge, q.device, (n, h, 1), (d, 1, 1), merge_args)

    def _prefill(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out, *,
                 max_query_len: int) -> None:
        plan = lp.plan_prefill(shapes.num_seqs, shapes.num_kv_heads, shapes.group, max_query_len)
        defines = lp.compile_defines(q.dtype, shapes.head_dim, shapes.block_size)
        args = (
            _ptr(out), _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables), _ptr(seq_lens),
            _ptr(cu_seqlens_q), np.int32(shapes.num_heads), np.int32(shapes.num_kv_heads),
            np.int32(shapes.max_blocks_per_seq), np.int64(q.stride(0)), np.float32(scale * LOG2E),
        )
        self._launch(self._function("prefill.cu", "omnibus_prefill", defines), q.device, plan.grid, plan.block, args)


def _require_cuda(t: torch.Tensor) -> None:
    if not t.is_cuda:
        raise ValueError(f"the CUDA kernels need CUDA tensors, got a tensor on {t.device}")


@functools.cache
def default_attention() -> CudaAttention:
    """The process-wide kernel cache used by the module-level functions."""
    return CudaAttention()


def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """CUDA `write_kv`; see `CudaAttention.write_kv`."""
    default_attention().write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, **kwargs) -> torch.Tensor:
    """CUDA `paged_attention`; see `CudaAttention.paged_attention`."""
    return default_attention().paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                               **kwargs)


def cuda_attention_ops():
    """`AttentionOps` backed by these kernels, for building a model on the GPU."""
    from kernels.reference import AttentionOps

    return AttentionOps(write_kv=write_kv, paged_attention=paged_attention)
