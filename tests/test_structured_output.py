"""Structured outputs on the real default model, through gRPC and through the official openai client.

Every output is checked with a reference independent of the constraint library: `json` and
`jsonschema`, Python's `re`. Constrained and unconstrained requests share steps, and the
unconstrained ones must come out exactly as when they run alone (a mask that leaked into another
row would change them).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest

from omnibus.v1 import generation_pb2 as pb
from tests.server_harness import ServerThread, collect_tokens

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
COLOURS = {"type": "object", "properties": {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                        "minItems": 1, "maxItems": 3}},
           "required": ["colours"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"sunny": {"type": "boolean"}, "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"}},
        "required": ["sunny", "city"], "additionalProperties": False}


@pytest.fixture(name="server")
def _server(shared_server):
    return shared_server


@pytest.fixture(name="client")
def _client(shared_openai_client):
    return shared_openai_client


def chat_request(request_id: str, content: str, max_tokens: int, **structured) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, messages=[pb.ChatMessage(role="user", content=content)],
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **structured),
    )


def generate_all(server: ServerThread, requests: list[pb.GenerateRequest]) -> dict[str, tuple[list[int], str, pb.GenerateResponse]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        results = pool.map(lambda r: collect_tokens(server.stub(), r, timeout_s=120), requests)
        return {r.request_id: result for r, result in zip(requests, results)}


def test_json_schemas_hold_in_a_batch_with_unconstrained_requests(server):
    constrained = [
        chat_request("person", "Describe a person as JSON.", 40, json_schema=json.dumps(PERSON)),
        chat_request("colours", "List some colours as JSON.", 30, json_schema=json.dumps(COLOURS)),
        chat_request("flag", "Is it sunny in Paris? Answer in JSON.", 30, json_schema=json.dumps(FLAG)),
    ]
    free = [chat_request("free-1", "Tell me about the sea.", 20), chat_request("free-2", "What is a cat?", 20)]
    alone = {}
    for request in free:
        solo = pb.GenerateRequest()
        solo.CopyFrom(request)
        solo.request_id = f"{request.request_id}-alone"
        alone[request.request_id] = collect_tokens(server.stub(), solo)[0]
    results = generate_all(server, constrained + free)
    for request, schema in zip(constrained, (PERSON, COLOURS, FLAG)):
        _, text, last = results[request.request_id]
        assert last.finish_reason == pb.FINISH_REASON_STOP, text  # complete: the constraint ended it
        jsonschema.validate(json.loads(text), schema)
    for request in free:
        assert results[request.request_id][0] == alone[request.request_id]
    shared_steps = server.call(lambda app: steps_running_all(app, [r.request_id for r in constrained + free]))
    assert shared_steps > 0
    assert server.call(lambda app: len(app.engine.structured)) == 0  # every matcher released


def steps_running_all(app, client_request_ids: list[str]) -> int:
    """How many steps computed tokens of all these requests at once."""
    req_ids = {r.req_id for r in app.engine.request_records if r.client_request_id in client_request_ids}
    assert len(req_ids) == len(client_request_ids)
    return sum(1 for record in app.engine.scheduler.records if req_ids <= record.num_scheduled_tokens.keys())


def test_regex_and_grammars_hold(server):
    regex = r"[0-9]{3}-[0-9]{4}"
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    gbnf = 'root ::= item ("," item)*\nitem ::= "apple" | "pear" | "plum"'
    requests = [
        chat_request("regex", "Give me a phone number.", 20, regex=regex),
        chat_request("lark", "Is water wet?", 20, grammar=lark),
        chat_request("gbnf", "Name some fruit.", 12, grammar=gbnf),
    ]
    results = generate_all(server, requests)
    _, text, last = results["regex"]
    assert re.fullmatch(regex, text) and last.finish_reason == pb.FINISH_REASON_STOP, text
    _, text, last = results["lark"]
    assert re.fullmatch(r"The answer is (yes|no)\.", text) and last.finish_reason == pb.FINISH_REASON_STOP, text
    _, text, last = results["gbnf"]
    # Unbounded: it ends at max_tokens or when the model stops listing; either way a valid prefix.
    pattern = r"(apple|pear|plum)(,(apple|pear|plum))*"
    assert re.fullmatch(pattern, text) if last.finish_reason == pb.FINISH_REASON_STOP else re.match(pattern, text), text


@pytest.mark.parametrize("structured, field", [
    ({"json_schema": '{"type": "object", "properties": '}, "sampling.json_schema"),
    ({"json_schema": '{"type": "objcet"}'}, "sampling.json_schema"),
    ({"regex": "([0-9]+"}, "sampling.regex"),
    ({"grammar": "start: undefined_rule"}, "sampling.grammar"),
])
def test_malformed_constraints_are_refused_and_the_server_keeps_serving(server, structured, field):
    with pytest.raises(grpc.RpcError) as caught:
        collect_tokens(server.stub(), chat_request("bad", "Hi", 8, **structured))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert server.call(lambda app: app.engine.num_active_requests) == 0  # never queued
    _, text, last = collect_tokens(server.stub(), chat_request("after", "Say yes or no.", 4, regex="yes|no"))
    assert text in ("yes", "no") and last.finish_reason == pb.FINISH_REASON_STOP


def test_openai_chat_json_schema(client):
    completion = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_openai_streamed_json_object_and_regex(client):
    stream = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "Describe a dog as a JSON object."}], max_tokens=40,
        temperature=0, response_format={"type": "json_object"}, stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    stream = client.completions.create(model="test-model", prompt="My phone number is", max_tokens=12, temperature=0,
                                       stream=True, extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}})
    chunks = list(stream)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", "".join(c.choices[0].text for c in chunks)), chunks
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_choice_and_malformed_constraints(client):
    completion = client.completions.create(model="test-model", prompt="Is the sky blue? Answer:", max_tokens=5,
                                           temperature=0, extra_body={"guided_choice": [" yes", " no"]})
    assert completion.choices[0].text in (" yes", " no")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objcet"}}},
        )
    assert caught.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="test-model", prompt="Hi", max_tokens=5, extra_body={"guided_regex": "(a"})
    assert caught.value.body["param"] == "guided_regex"


def test_cost_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "cost.json"
    command = [sys.executable, "-m", "benchmarks.structured_output_cost", "--batch", "4", "--constrained", "0", "2",
               "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1", "--result-json", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["constrained"] for r in rows] == [0, 2]
    assert rows[0]["plan_bytes"] < rows[1]["plan_bytes"]  # two masks of 49152 bits travel in the second
    assert rows[1]["plan_bytes"] - rows[0]["plan_bytes"] >= 2 * 49152 // 8
