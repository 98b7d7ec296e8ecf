"""The CPU paged-attention kernels (`kernels/cpu/*.cpp`), built with torch's extension toolchain.

`CpuAttention` builds (once; torch caches the binary under the Omnibus cache and rebuilds when a
source changes) and loads the extension, picks the best ISA build this CPU runs (AVX-512, else
AVX2) and exposes `write_kv` / `paged_attention` with the signatures of `kernels.reference`, so a
test can swap one for the other. `load_cpu_attention()` returns None, with the reason, where the
extension cannot be built (no compiler, no AVX2): the worker then keeps the reference.

CLI: `python -m kernels.cpu_ops build` builds the extension and prints the ISAs it can run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from kernels.reference import AttentionOps

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "cpu"
SOURCES = ("ops.cpp", "attention_avx512.cpp", "attention_avx2.cpp", "elementwise.cpp", "elementwise_avx512.cpp",
           "elementwise_avx2.cpp", "block_linear.cpp", "block_linear_avx512.cpp", "block_linear_avx2.cpp")
HEADERS = ("attention.h", "attention_impl.h", "kv_quantize_impl.h", "elementwise.h", "elementwise_impl.h",
           "block_linear.h", "block_linear_impl.h", "block_linear_binding.h", "simd_avx512.h", "simd_avx2.h",
           "cpu_features.h", "isa_choice.h")
# -fopenmp: at::parallel_for is inline OpenMP; the extension then shares torch's libgomp (same
# SONAME, already loaded) and so its thread pool.
_CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]
_STALE_LOCK_S = 600.0  # longer than any build takes on 2 cores
_MODULE_NAME = "omnibus_cpu_attention"


class CpuAttention:
    """The loaded extension and the ISA it runs; methods match `kernels.reference`."""

    def __init__(self, module: ModuleType, isa: str | None = None):
        supported = list(module.supported_isas())
        if not supported:
            raise RuntimeError("this CPU has neither AVX-512 nor AVX2 + FMA + F16C")
        if isa is not None and isa not in supported:
            raise ValueError(f"isa {isa!r} is not supported by this CPU (supported: {supported})")
        self._module = module
        self.isa = isa or supported[0]
        self.supported_isas = supported

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        # An int8 cache quantizes float32 rows itself (kernels/int8_kv.py); others take their dtype.
        target = torch.float32 if k_cache.dtype == torch.int8 else k_cache.dtype
        if key.dtype != target:
            key, value = key.to(target), value.to(target)
        self._module.write_kv(key, value, k_cache, v_cache, slot_mapping, self.isa)

    def paged_attention(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, *,
                        query_lens_cpu=None, seq_lens_cpu=None, out=None) -> torch.Tensor:
        """`out=` (contiguous, q's shape and dtype) is written in place, padding rows zeroed."""
        # The kernel reads the (host) index tensors itself; the *_cpu hints are not needed.
        return self._module.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                                            float(scale), self.isa, out)

    def ops(self) -> AttentionOps:
        return AttentionOps(write_kv=self.write_kv, paged_attention=self.paged_attention)


def build_directory() -> Path:
    """Where the compiled extension lives: per torch version and source digest, in our cache."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(_CFLAGS).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    # Beside torch's own extension builds, not in the model cache: a worker given a fresh
    # $OMNIBUS_CACHE_DIR (tests do) must not spend a minute compiling the same sources again.
    default = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    root = Path(os.environ.get("OMNIBUS_KERNEL_CACHE_DIR") or default / "omnibus").expanduser()
    return root / f"{tag}-{digest.hexdigest()[:12]}"


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the extension; raises when it cannot be built."""
    directory = build_directory()
    built = directory / f"{_MODULE_NAME}.so"
    if built.exists() and not (directory / "lock").exists():
        # The directory is named by the sources' digest, so this binary is theirs: skip the
        # toolchain's up-to-date check (seconds per worker start).
        return _import_built(built)
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory)
    return cpp_extension.load(
        name=_MODULE_NAME,
        sources=[str(SOURCE_DIR / name) for name in SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=verbose,
    )


def load_cpu_attention(isa: str | None = None) -> tuple[CpuAttention | None, str]:
    """(kernels, "") or (None, why not): never raises for a missing toolchain or CPU feature."""
    try:
        return CpuAttention(build_extension(), isa), ""
    except ValueError:
        raise
    except Exception as error:  # compiler, ninja or headers missing; a CPU without AVX2
        return None, f"{type(error).__name__}: {error}".strip()


def _import_built(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remove_stale_lock(directory: Path, max_age_s: float = _STALE_LOCK_S) -> None:
    # torch serialises builds with a lock file and waits for it to vanish; a build killed midway
    # (Ctrl-C during setup) leaves it behind, and every later worker would wait forever.
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            logger.warning("removing a stale build lock %s", lock)
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _put_ninja_on_path() -> None:
    # torch runs `ninja` from PATH; the PyPI package installs it beside the interpreter, which a
    # worker started by absolute path may not have on PATH.
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.cpu_ops")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--optional", action="store_true",
                        help="exit 0 with a warning when the extension cannot be built")
    args = parser.parse_args(argv)
    try:
        kernels = CpuAttention(build_extension(verbose=args.verbose))
    except Exception as error:
        print(f"CPU attention kernels not built: {type(error).__name__}: {error}", file=sys.stderr)
        return 0 if args.optional else 1
    print(f"CPU attention kernels built in {build_directory()}: ISAs {kernels.supported_isas}, "
          f"using {kernels.isa}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
