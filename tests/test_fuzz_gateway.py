"""Issue 16, item 4: schemathesis fuzzes the OpenAI gateway from its own OpenAPI schema (FastAPI's
/openapi.json), in front of the real server the gRPC fuzz test uses.

Bodies that fit the schema and bodies that do not, on every route: no answer is a 5xx but 503 and
504 (what an absent or slow upstream earns). After the run the server still serves and holds no
request and no KV block.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import requests
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from gateway_svc.app import create_app
from gateway_svc.config import GatewayConfig
from tests.fuzz_support import assert_unharmed
from tests.gateway_harness import MODEL, GatewayThread

# A CI-sized run; OMNIBUS_FUZZ_EXAMPLES=2000 fuzzes for longer.
MAX_EXAMPLES = int(os.environ.get("OMNIBUS_FUZZ_EXAMPLES", "60"))
UPSTREAM_ABSENT = {503, 504}
CHEAP_TOKENS = 3  # a valid max_tokens above this is lowered to it: the fuzz is of the API, not the model
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
INPUTS = ("prompt", "messages")
PLAIN_INPUTS = {"prompt": "Hello", "messages": [{"role": "user", "content": "Hi"}]}
KV_TOKENS = 1024  # the fuzz server's pool: larger requests are refused, cheaply


@pytest.fixture(scope="module")
def gateway(fuzz_server):
    running = GatewayThread(fuzz_server.target).start()
    yield running
    running.stop()


def shape(body: object, draw) -> None:
    """Make a generated body reach the model more often, and cheaply: half the time keep only its
    input (often replaced by a plain one) and at most two other fields (schema-valid bodies with
    every field drawn are nearly all refused by the server's range checks), often name the served
    model (else: 404), and lower what would generate long (the server's default of 256 tokens
    included)."""
    if not isinstance(body, dict):
        return
    if draw(st.booleans()):
        optional = sorted(set(body) - set(INPUTS))
        keep = draw(st.sets(st.sampled_from(optional), max_size=2)) if optional else set()
        for name in set(optional) - keep:
            del body[name]
        for name in set(INPUTS) & set(body):
            if draw(st.booleans()):
                body[name] = PLAIN_INPUTS[name]
    if isinstance(body.get("prompt"), list):
        # JSON Schema's integers include 93.0, which the gateway refuses as a token id (a 400):
        # written as integers, they test the rest of the body.
        body["prompt"] = _integral_floats_as_ints(body["prompt"])
    if "model" in body and draw(st.booleans()):
        body["model"] = MODEL
    for name in TOKEN_FIELDS:
        value = body.get(name)
        if type(value) is int and CHEAP_TOKENS < value <= KV_TOKENS:
            body[name] = CHEAP_TOKENS
    if all(name not in body for name in TOKEN_FIELDS):
        body["max_tokens"] = CHEAP_TOKENS
    if type(body.get("n")) is int and 2 < body["n"] <= 64:
        body["n"] = 2


def _integral_floats_as_ints(value):
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


@pytest.mark.model
def test_fuzzed_gateway_requests_never_answer_a_server_error(gateway, fuzz_server):
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=30)
    positive, negative = (schema.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
    cases = st.one_of(positive, positive, negative)  # two thirds fit the schema
    statuses, refusals = Counter(), Counter()

    with requests.Session() as session:
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases, data=st.data())
        def answer_is_no_server_error(case, data) -> None:
            shape(case.body, data.draw)
            response = case.call(base_url=gateway.url, session=session, timeout=60)
            statuses[response.status_code] += 1
            if response.status_code == 400:
                refusals[response.text[:80]] += 1
            assert response.status_code < 500 or response.status_code in UPSTREAM_ABSENT, (
                f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text[:1000]}")

        answer_is_no_server_error()
    print(f"statuses: {dict(statuses)}; most common 400s: {refusals.most_common(5)}")
    # The bodies must keep reaching the server, not only the gateway's validation.
    assert statuses[200] >= MAX_EXAMPLES // 10 and sum(n for s, n in statuses.items() if 400 <= s < 500), statuses
    assert_unharmed(fuzz_server)


def test_a_finding_of_this_fuzzer_stays_fixed_the_logit_bias_error_names_the_key():
    """The fuzzer's 400s once read "got {key!r}": pydantic's message templates take `{key}` only."""
    with TestClient(create_app(GatewayConfig(target="127.0.0.1:1"))) as http:
        response = http.post("/v1/completions", json={"prompt": "hi", "logit_bias": {"abc": 1.0}})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "logit_bias: keys must be token ids, got 'abc'"
