"""Shared fixtures. The real default model is prepared and loaded at most once per session."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed, so a failure can be replayed), applied to torch's global RNG."""
    value = secrets.randbits(31)
    print(f"seed={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's torch ops on one thread: on a busy machine OpenMP workers that spin waiting
    for a descheduled sibling make each op cost a time slice (10x slower tests on 2 shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model's local directory (dequantized into the Omnibus cache on first use)."""
    from worker_svc.model_store import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def default_model(model_dir: Path):
    """Our `LlamaForCausalLM` for the default model: float32, CPU, loaded once."""
    from worker_svc.model_store import load_model

    return load_model(model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(model_dir: Path):
    """Hugging Face's reference implementation of the default model (float32, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def fuzz_server(model_dir: Path):
    """One real server (default model, a 64-block pool) for the fuzz tests, which must leave it
    unharmed (tests/fuzz_support.py)."""
    from tests.fuzz_support import start_fuzz_server

    running = start_fuzz_server(model_dir)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def shared_server(model_dir: Path):
    """One real server (default model, a 256-block pool) for the modules that need nothing special
    of it; each test must leave it idle. Saves a model load per module."""
    from tests.server_harness import ServerThread

    running = ServerThread(model_dir, num_kv_blocks=256).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def shared_openai_client(shared_server):
    """The official `openai` client through a gateway in front of `shared_server`."""
    import openai

    from tests.gateway_harness import GatewayThread

    with GatewayThread(shared_server.target) as gateway:
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            yield client


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all from that CA."""
    from tests.certificates import write_certificates

    return write_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def spine_prompts(model_dir: Path) -> list[list[int]]:
    """The spine's chat prompts (tests/greedy_reference.py), tokenized."""
    from tests.greedy_reference import spine_prompts as tokenize_spine

    return tokenize_spine(model_dir)


@pytest.fixture(scope="session")
def spine_reference(model_dir: Path, spine_prompts: list[list[int]]):
    """Per spine prompt: transformers' greedy token ids and top-2 logit gap per step."""
    from tests.greedy_reference import greedy_reference

    return greedy_reference(model_dir, spine_prompts)
