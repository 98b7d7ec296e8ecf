"""What travels to the GPU machine: the default model in two parts, and the wheel set.

A device call carries at most 64 MiB with the tree (device/README.md). The default model's GGUF
is 94 MiB, so `stage_model` splits it in halves that two consecutive calls carry, and
`assemble_model` puts it back together on the machine (which keeps the first half while warm).
The GPU image lacks a few of our dependencies; `check_wheel_set` checks that the carried wheels
and the image's packages together cover every requirement, and `live_wheel_check` installs them
with the image's Python version into an empty folder and serves a request through them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from scripts.gpu_serving import wait_until_serving, generate_greedy, stop_process, write_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL_PARTS = ("model-a", "model-b")  # folders under the wheel folder, carried one per device call
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GPU image's Python packages (device/KINDS.md, read 2026-11-17): what need not travel.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Project dependencies that serving, the tests and the benchmarks here never import (the gateway's).
NOT_NEEDED_ON_GPU = frozenset({"fastapi", "uvicorn"})


def stage_model(gguf: Path, dest: Path) -> list[Path]:
    """Split the default model's GGUF into halves under dest/model-a and dest/model-b.

    The GGUF (94 MiB) is larger than what one device call carries (64 MiB with the tree), so two
    consecutive calls carry one half each; a warm machine keeps the first between them. Each part
    has a manifest beside it with the whole file's size and digest.
    """
    data = gguf.read_bytes()
    half = (len(data) + 1) // 2
    manifest = {"file": gguf.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                "parts": len(MODEL_PARTS)}
    written = []
    for index, name in enumerate(MODEL_PARTS):
        folder = dest / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        part = folder / f"{gguf.name}.part{index}"
        part.write_bytes(data[index * half:(index + 1) * half])
        (folder / f"{part.name}.json").write_text(json.dumps(manifest | {"index": index}))
        written.append(part)
    return written


def assemble_model(sources: list[Path], staging: Path) -> Path | None:
    """Copy any carried parts into `staging` (which outlives a call on a warm machine) and, once
    every part is there and the digest matches, return the reassembled GGUF; else None."""
    staging.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for item in sorted(source.glob("*.part*")) if source.is_dir() else []:
            shutil.copy2(item, staging / item.name)
    manifests = [json.loads(p.read_text()) for p in sorted(staging.glob("*.part*.json"))]
    if not manifests:
        return None
    expected = manifests[0]
    parts = [staging / f"{expected['file']}.part{i}" for i in range(expected["parts"])]
    if not all(p.exists() for p in parts):
        return None
    target = staging / expected["file"]
    if not (target.exists() and _sha256(target) == expected["sha256"]):
        with target.open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())
    return target if _sha256(target) == expected["sha256"] else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the carried wheel set -----------------------------------------------------------------------


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_requirements(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines without extras) of one wheel file."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    field_value = {k: v for k, v in (line.split(": ", 1) for line in lines if ": " in line and not line.startswith(" "))}
    requires = [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ")]
    return _canonical(field_value["Name"]), field_value["Version"], [r for r in requires if "extra ==" not in r]


def check_wheel_set(wheels: list[Path], python_version: str = "3.12") -> list[str]:
    """What the carried wheels plus the GPU image leave unmet (empty when the set is complete):
    one version per package, every wheel's requirements met, every project dependency present."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "platform_machine": "x86_64", "os_name": "posix"}
    carried: dict[str, str] = {}
    problems = []
    parsed = [wheel_requirements(w) for w in wheels]
    for name, version, _ in parsed:
        if name in carried:
            problems.append(f"{name}: two versions carried ({carried[name]}, {version})")
        carried[name] = version
    for name, _, requires in parsed:
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            dep = _canonical(requirement.name)
            if dep in carried:
                if not requirement.specifier.contains(Version(carried[dep]), prereleases=True):
                    problems.append(f"{name} needs {text}, carried {dep} {carried[dep]}")
            elif dep not in IMAGE_PACKAGES:
                problems.append(f"{name} needs {text}: neither carried nor in the GPU image")
    for text in project_dependencies():
        dep = _canonical(Requirement(text).name)
        if dep not in carried and dep not in IMAGE_PACKAGES and dep not in NOT_NEEDED_ON_GPU:
            problems.append(f"the project needs {text}: neither carried nor in the GPU image")
    return problems


CARRIED_MODULES = ("grpc", "google.protobuf", "zmq", "msgspec", "gguf", "llguidance", "grpc_health.v1.health",
                   "grpc_reflection.v1alpha.reflection")


def live_wheel_check(python: str, wheels: list[Path], work: Path) -> list[str]:
    """Install the wheels with `python` (the GPU image's version) into an empty folder, check that
    they shadow whatever that interpreter already has, and serve one request through a scheduler
    and the null worker (no torch) on them: gRPC, health, ZeroMQ and msgpack for real."""
    target = work / "site"
    shutil.rmtree(target, ignore_errors=True)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--target", str(target), *map(str, wheels)],
                             capture_output=True, text=True)
    if install.returncode != 0:
        return [f"pip install --no-index --target failed: {install.stderr.strip()[-500:]}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(REPO), str(REPO / "protos")]))
    probe = "import importlib, sys\nfor m in sys.argv[1:]:\n    print(m, importlib.import_module(m).__file__)"
    run = subprocess.run([python, "-c", probe, *CARRIED_MODULES], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return [f"importing the carried modules failed: {run.stderr.strip()[-500:]}"]
    problems = [f"{line.split()[0]} comes from {line.split()[1]}, not the carried wheels"
                for line in run.stdout.splitlines() if not line.split()[1].startswith(str(target))]
    return problems + _serve_one_request(python, env, work)


def _serve_one_request(python: str, env: dict, work: Path) -> list[str]:
    import socket

    model = work / "model"
    write_word_tokenizer(model, 1000)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1000}))
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    endpoint = f"tcp://127.0.0.1:{ports[1]}"
    logs = [(work / name).open("w") for name in ("scheduler.log", "worker.log")]
    scheduler = subprocess.Popen([python, "-m", "clients.cli", "--log-level", "warning", "scheduler", "--model",
                                  str(model), "--port", str(ports[0]), "--metrics-port", "0", "--worker-bind",
                                  endpoint], env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([python, "-m", "benchmarks.null_worker", "--scheduler", endpoint], env=env,
                              stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        from benchmarks.compare_batching import wait_serving

        target = f"127.0.0.1:{ports[0]}"
        wait_until_serving(scheduler, target, 120, wait_serving)
        tokens = generate_greedy(target, [[5, 6, 7]], 4, timeout_s=60)[0]
        return [] if len(tokens) == 4 else [f"served {len(tokens)} tokens, not 4"]
    except Exception as exc:
        return [f"serving through the carried wheels failed: {type(exc).__name__}: {exc}"]
    finally:
        for process in (worker, scheduler):
            stop_process(process, grace_s=20)
        for log in logs:
            log.close()


def project_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
