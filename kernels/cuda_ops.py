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
import os
import shutil
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from kernels import launch_plan as lp

KERNEL_DIR = Path(__file__).resolve().parent
LOG2E = 1.4426950408889634


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _host_list(values) -> list[int] | None:
    """Host lengths (a list, tuple or numpy array) as a list of ints, so route planning is plain Python."""
    if values is None:
        return None
    return values.tolist() if hasattr(values, "tolist") else list(values)


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
        # The last slot_mapping found in bounds, with its version counter and cache size: a model
        # passes one slot_mapping to every layer of a step, so the host check (which waits for
        # the device) runs once a step, not once a layer.
        self._checked_slots: tuple[weakref.ref, int, int] | None = None

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
        """Store key/value `[num_tokens, num_kv_heads, head_dim]` at their slots; slots < 0 are skipped.

        A slot past the cache raises IndexError, as in the reference, before anything is written.
        """
        row_bytes = lp.check_write_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
        _require_cuda(key)
        num_tokens = key.shape[0]
        if num_tokens == 0:
            return
        self._check_slots(slot_mapping, k_cache)
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

    def _check_slots(self, slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        checked = self._checked_slots
        if (checked is not None and checked[0]() is slot_mapping and checked[1] == slot_mapping._version
                and checked[2] == num_slots):
            return
        lp.check_slots(int(slot_mapping.max()), k_cache)
        self._checked_slots = (weakref.ref(slot_mapping), slot_mapping._version, num_slots)

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

        `query_lens_cpu` / `seq_lens_cpu` (host copies, optional) pick and size the kernels:
        with them, decode rows (q_len 1, even inside a mixed batch) run the split-KV decode kernel
        and longer chunks the tensor-core prefill kernel; without them see
        `launch_plan.route_attention`. Rows past `cu_seqlens_q[-1]` (padding) come out as zeros.
        `num_splits` forces the decode split count (testing); `use_tensor_cores=False` runs every
        row through the exact one-row-per-CTA kernel.
        """
        shapes = lp.check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q)
        _require_cuda(q)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        else:
            lp.check_out(out, q)
        if shapes.num_tokens == 0:
            return out
        if shapes.num_seqs == 0:
            return out.zero_()  # every row is padding
        route = lp.route_attention(shapes, _host_list(query_lens_cpu), _host_list(seq_lens_cpu),
                                   use_tensor_cores=use_tensor_cores)
        if route.zero_from is not None:
            out[route.zero_from:].zero_()
        if route.decode is not None:
            self._decode(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                         route.decode, num_splits=num_splits)
        if route.prefill is not None:
            self._prefill(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                          route.prefill)
        return out

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                launch: lp.DecodeLaunch, *, num_splits: int | None) -> None:
        plan = lp.plan_decode(launch.work_rows, shapes.num_kv_heads, launch.max_kv_len, self._sm_count(q.device),
                              num_splits=num_splits, launch_rows=launch.launch_rows)
        defines = lp.compile_defines(q.dtype, shapes.head_dim, shapes.block_size, lp.group_bucket(shapes.group))
        n, h, d = launch.launch_rows, shapes.num_heads, shapes.head_dim
        if plan.num_splits > 1:
            part_out = torch.empty((plan.num_splits, n, h, d), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((plan.num_splits, n, h), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when there is one split
        args = (
            _ptr(out), _ptr(part_out), _ptr(part_lse), _ptr(q), _ptr(k_cache), _ptr(v_cache),
            _ptr(block_tables), _ptr(seq_lens), _ptr(cu_seqlens_q),
            np.int32(shapes.num_seqs), np.int32(n), np.int32(h), np.int32(shapes.num_kv_heads),
            np.int32(shapes.max_blocks_per_seq), np.int64(q.stride(0)), np.int32(launch.mode),
            np.float32(scale * LOG2E), np.int32(plan.partition_size),
        )
        self._launch(self._function("decode.cu", "omnibus_decode", defines), q.device, plan.grid, plan.block, args)
        if plan.num_splits > 1:
            merge = self._function("decode.cu", "omnibus_decode_merge", defines)
            merge_args = (_ptr(out), _ptr(part_out), _ptr(part_lse), _ptr(cu_seqlens_q), np.int32(n), np.int32(h),
                          np.int32(plan.num_splits), np.int32(launch.mode))
            self._launch(merge, q.device, (n, h, 1), (d, 1, 1), merge_args)

    def _prefill(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, shapes, out,
                 launch: lp.PrefillLaunch) -> None:
        plan = lp.plan_prefill(launch.num_tiles, shapes.num_kv_heads)
        defines = lp.compile_defines(q.dtype, shapes.head_dim, shapes.block_size)
        args = (
            _ptr(out), _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables), _ptr(seq_lens),
            _ptr(cu_seqlens_q), np.int32(shapes.num_seqs), np.int32(shapes.num_tokens), np.int32(shapes.num_heads),
            np.int32(shapes.num_kv_heads), np.int32(shapes.max_blocks_per_seq), np.int64(q.stride(0)),
            np.float32(scale * LOG2E), np.int32(launch.skip_single), np.int32(launch.zero_padding),
        )
        self._launch(self._function("prefill.cu", "omnibus_prefill", defines), q.device, plan.grid, plan.block, args)


def configurations() -> list[tuple[str, tuple[str, ...]]]:
    """Every (source, defines) the wrappers can compile: what a fully warm kernel cache holds."""
    buckets = sorted({lp.group_bucket(g) for g in range(1, lp.MAX_DECODE_GROUP + 1)})
    configs = [("kv_write.cu", ())]
    for dtype in lp.SUPPORTED_DTYPES:
        for head_dim in lp.SUPPORTED_HEAD_DIMS:
            for block_size in lp.SUPPORTED_BLOCK_SIZES:
                configs.append(("prefill.cu", lp.compile_defines(dtype, head_dim, block_size)))
                configs += [("decode.cu", lp.compile_defines(dtype, head_dim, block_size, g)) for g in buckets]
    return configs


def compile_configuration(config: tuple[str, tuple[str, ...]]) -> tuple[bool, float, str]:
    """Compile one configuration into CuPy's on-disk cache: (ok, seconds, error text)."""
    start = time.perf_counter()
    try:
        CudaAttention()._compile(*config)
        return True, time.perf_counter() - start, ""
    except Exception as exc:  # reported per configuration by the caller
        return False, time.perf_counter() - start, str(exc)


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
