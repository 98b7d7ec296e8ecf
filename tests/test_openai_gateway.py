"""The OpenAI gateway against a live server, driven by the official `openai` client.

The server runs in this process (ServerThread, real model); the gateway runs under uvicorn in a
thread on an ephemeral loopback port, with its own event loop, as it would in production.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from clients.client import tls_credentials
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.tls import TlsConfig
from tests.gateway_harness import MODEL, GatewayThread
from tests.server_harness import ServerThread, collect_tokens, greedy_request

pytestmark = pytest.mark.model

PROMPT = "The three primary colours are"
TOKEN_PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 2541]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# One torch thread: on a busy 2-core machine spinning OpenMP workers make steps 10x slower.


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerThread(model_dir, num_kv_blocks=256).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gateway(server):
    running = GatewayThread(server.target).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(gateway):
    # No retries: a 5xx here is a failure to see, not to hide.
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def active_requests(server: ServerThread) -> int:
    return server.call(lambda app: app.engine.num_active_requests)


def wait_idle(server: ServerThread, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while active_requests(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active_requests(server) == 0, "the server still generates for a client that left"


def test_health_and_models(gateway, client, server):
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    [model] = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "omnibus")
    assert model.max_model_len == info.max_model_len > 0
    assert model.created > 0


@pytest.mark.parametrize("prompt", [PROMPT, TOKEN_PROMPT], ids=["text", "token_ids"])
def test_greedy_completion_equals_the_grpc_answer(client, server, prompt):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True}, extra_headers={"X-Request-Id": "gw-greedy"},
    )
    completion = raw.parse()
    request = (pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
               if isinstance(prompt, str) else greedy_request(prompt, max_tokens=8))
    tokens, text, last = collect_tokens(server.stub(), request)
    [choice] = completion.choices
    assert (choice.text, choice.token_ids, choice.finish_reason) == (text, tokens, "length")
    assert len(tokens) == 8
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (last.usage.prompt_tokens, 8)
    assert usage.total_tokens == usage.prompt_tokens + 8
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    assert completion.object == "text_completion" and completion.model == MODEL
    assert completion.id == "cmpl-gw-greedy" and raw.headers["x-request-id"] == "gw-greedy"


def test_streaming_chat_with_usage_equals_the_whole_answer(client, server):
    kwargs = dict(model=MODEL, messages=CHAT, max_completion_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert text == whole.choices[0].message.content != ""
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and all(chunk.usage is None for chunk in chunks[:-1])
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1

    messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT]
    _, grpc_text, _ = collect_tokens(server.stub(), pb.GenerateRequest(
        messages=messages, sampling=pb.SamplingParams(max_tokens=12, temperature=0)))
    assert grpc_text == text


def test_chat_text_parts_read_as_the_string(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1)
    as_string = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_cached_tokens_and_cache_salt_reach_the_server(client):
    # The prompt fills two 16-token blocks: a repeat reuses them unless its salt differs.
    def cached(salt: str) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, extra_body={"cache_salt": salt})
        return reply.usage.prompt_tokens_details.cached_tokens

    cached("tenant-a")
    assert cached("tenant-a") >= 16
    assert cached("tenant-b") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_values_are_bad_requests_naming_the_field(client, stream):
    with pytest.raises(openai.BadRequestError) as error:  # checked by the server
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1, max_tokens=4, stream=stream)
    assert error.value.param == "temperature" and "temperature" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:  # checked by the gateway
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, stream=stream)
    assert error.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as error:  # the server's message, the client's name
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=100_000, stream=stream)
    assert error.value.param == "max_completion_tokens" and "max_tokens" in error.value.message


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert error.value.code == "model_not_found" and MODEL in error.value.message


def test_unsupported_parameters_are_rejected(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True)
    assert error.value.param == "echo"
    # Out of the server's range: named as the chat parameter the client sent.
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=21)
    assert error.value.param == "top_logprobs"


def test_closing_a_stream_frees_the_request_on_the_server(client, server):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then the first text
    assert active_requests(server) == 1
    stream.close()
    wait_idle(server)


def test_a_client_timing_out_frees_the_request_on_the_server(client, server):
    impatient = client.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, extra_body={"ignore_eos": True})
    wait_idle(server)


def test_gateway_reaches_an_mtls_server(model_dir, certs):
    tls = TlsConfig(certs["server_cert"], certs["server_key"], certs["ca"])
    server = ServerThread(model_dir, num_kv_blocks=32, tls=tls,
                          credentials=tls_credentials(certs["ca"], certs["client_cert"], certs["client_key"])).start()
    gateway = GatewayThread(server.target, tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                            tls_key=certs["client_key"]).start()
    try:
        assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
        reply = httpx.post(f"{gateway.url}/v1/completions", timeout=60,
                           json={"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}).json()
        assert reply["usage"]["completion_tokens"] == 2
    finally:
        gateway.stop()
        server.stop()
