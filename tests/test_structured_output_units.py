"""Structured outputs without a model: compiling constraints, masks on the plan, the worker's
masking, the engine's hooks and the gateway's mapping.

Outputs are generated from random logits through the real path (the scheduler's matchers, the
mask packed into the plan, the worker's unpacking and -inf fill, argmax), and checked with
references written independently of llguidance: `json` + `jsonschema`, Python's `re`, Python's
own parser for an arithmetic grammar. The tokenizer is the hardening tests' tiny byte-level BPE.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re

import grpc
import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.null_worker import NullRunner, null_hello
from gateway_svc.app import create_app
from gateway_svc.config import GatewayConfig
from gateway_svc.errors import OpenAIError, from_rpc_error
from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest
from gateway_svc.translate import chat_request, completion_request
from gateway_svc import structured_output as gateway_structured
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc import protocol
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine, EngineError, ErrorKind
from scheduler_svc.proto_convert import InvalidArgument, ParsedRequest
from scheduler_svc.protocol import StepPlan, TokenMask
from scheduler_svc.request import Request, RequestStatus, SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.structured_output import MAX_CONSTRAINT_CHARS, Constraint, GrammarCompiler, Progress, StructuredOutputs
from scheduler_svc.tokenizer import ModelTokenizer
from tests.hardening_support import write_tiny_model_dir
from worker_svc.token_mask import apply_token_masks, unpack_allowed, unpack_bits

MAX_STEPS = 300


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> ModelTokenizer:
    return ModelTokenizer(write_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)


def sampling(**structured) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=8, **structured)


def generate(compiler, tokenizer, seed: int, **structured) -> tuple[str, Progress]:
    """One constrained output from seeded random logits, through matchers, plan masks and the
    worker's masking; greedy, so the output is the argmax of the masked logits."""
    outputs = StructuredOutputs()
    outputs.add("r", compiler.compile(sampling(**structured)))
    generator = torch.Generator().manual_seed(seed)
    token_ids, progress = [], Progress.OPEN
    for _ in range(MAX_STEPS):
        masks = outputs.token_masks(["r"])
        mask = protocol.decode_for_worker(protocol.encode(StepPlan(0, [], [], [], token_masks=masks))).token_masks
        logits = torch.randn(1, tokenizer.vocab_size, generator=generator)
        token = int(apply_token_masks(logits, ["r"], mask).argmax())
        token_ids.append(token)
        progress = outputs.advance("r", [token])
        if progress is not Progress.OPEN:
            break
    return tokenizer.decode(token_ids), progress


SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                      "nested": {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"],
                                                 "additionalProperties": False}},
     "required": ["name", "nested"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_outputs_parse_and_validate(compiler, tokenizer, schema, seed):
    text, progress = generate(compiler, tokenizer, seed, json_schema=json.dumps(schema))
    assert progress is Progress.COMPLETE, text
    jsonschema.validate(json.loads(text), schema)


def test_json_object_outputs_an_object(compiler, tokenizer):
    # An object of random content can be long: bounded by MAX_STEPS, it must still parse when complete.
    for seed in range(3):
        text, progress = generate(compiler, tokenizer, seed, json_object=True)
        if progress is Progress.COMPLETE:
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


@pytest.mark.parametrize("regex", [r"(yes|no)", r"[0-9]{3}-[a-z]{2,4}", r"(ab|cd)+!"])
def test_regex_outputs_match(compiler, tokenizer, regex):
    for seed in range(3):
        text, progress = generate(compiler, tokenizer, seed, regex=regex)
        if regex.endswith("+!"):
            assert progress is Progress.COMPLETE  # "!" ends it: nothing may follow
        assert re.fullmatch(regex, text), text


ARITHMETIC_LARK = r"""
start: expr
expr: NUMBER | "(" expr "+" expr ")"
NUMBER: /[1-9][0-9]?/
"""
ARITHMETIC_GBNF = r"""
root ::= expr
expr ::= num | "(" expr "*" expr ")"
num ::= [1-9]
"""


def only_operators(text: str, operator: type) -> bool:
    """Python's parser as the reference: the text is integers joined by one operator."""
    tree = ast.parse(text, mode="eval").body
    nodes = list(ast.walk(tree))
    return all(isinstance(n, (ast.BinOp, ast.Constant, operator)) for n in nodes)


@pytest.mark.parametrize("grammar, operator", [(ARITHMETIC_LARK, ast.Add), (ARITHMETIC_GBNF, ast.Mult)])
def test_grammar_outputs_parse(compiler, tokenizer, grammar, operator):
    complete = 0
    for seed in range(4):
        text, progress = generate(compiler, tokenizer, seed, grammar=grammar)
        if progress is Progress.COMPLETE:
            complete += 1
            assert only_operators(text, operator), text
    assert complete >= 1


@pytest.mark.parametrize("structured, field, words", [
    ({"json_schema": '{"type": '}, "sampling.json_schema", "not valid JSON"),
    ({"json_schema": "[1, 2]"}, "sampling.json_schema", "object or a boolean"),
    ({"json_schema": '{"type": "strnig"}'}, "sampling.json_schema", "strnig"),
    ({"json_schema": '{"type": "string", "format": "no-such-format"}'}, "sampling.json_schema", "no-such-format"),
    ({"json_schema": ""}, "sampling.json_schema", "must not be empty"),
    ({"regex": "[a-z"}, "sampling.regex", "unclosed character class"),
    ({"regex": "(ab"}, "sampling.regex", "regex"),
    ({"grammar": "start: missing_rule"}, "sampling.grammar", "missing_rule"),
    ({"grammar": "root ::= \"a\" undefined"}, "sampling.grammar", "undefined"),
    ({"regex": "a" * (MAX_CONSTRAINT_CHARS + 1)}, "sampling.regex", "at most"),
    ({"grammar": "start:"}, "sampling.grammar", "only the empty output"),
    ({"json_schema": "false"}, "sampling.json_schema", "matches no value"),
    ({"regex": ""}, "sampling.regex", "must not be empty"),
])
def test_malformed_constraints_name_their_field(compiler, structured, field, words):
    with pytest.raises(InvalidArgument) as caught:
        compiler.compile(sampling(**structured))
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


def test_the_schema_true_is_the_empty_schema(compiler, tokenizer):
    outputs = StructuredOutputs()
    outputs.add("true", compiler.compile(sampling(json_schema="true")))
    outputs.add("empty", compiler.compile(sampling(json_schema="{}")))
    prefix = tokenizer.encode('[1, "a"', add_special_tokens=False)
    assert outputs.advance("true", prefix) is outputs.advance("empty", prefix) is Progress.OPEN
    true_mask, empty_mask = outputs.token_masks(["true", "empty"])
    assert true_mask.allowed == empty_mask.allowed


def test_no_constraint_compiles_to_none(compiler):
    assert compiler.compile(sampling()) is None
    assert compiler.compile(sampling(json_object=False)) is None


def test_a_constraint_is_shared_but_each_request_has_its_own_matcher(compiler, tokenizer):
    constraint = compiler.compile(sampling(regex="(ab|cd)!"))
    outputs = StructuredOutputs()
    outputs.add("a", constraint)
    outputs.add("b", constraint)
    assert outputs.advance("a", tokenizer.encode("ab", add_special_tokens=False)) is Progress.OPEN
    assert outputs.advance("a", tokenizer.encode("!", add_special_tokens=False)) is Progress.COMPLETE
    assert outputs.advance("b", tokenizer.encode("cd", add_special_tokens=False)) is Progress.OPEN
    assert outputs.advance("b", tokenizer.encode("x", add_special_tokens=False)) is Progress.FAILED
    assert outputs.advance("unconstrained", [5]) is Progress.OPEN
    outputs.remove("a")
    outputs.remove("a")  # twice is harmless
    assert "a" not in outputs and len(outputs) == 1


class PanicException(BaseException):
    """Named as pyo3 names a Rust panic, which derives from BaseException too."""


class BrokenMatcher:
    """A matcher whose every call raises `error` (a library bug inside the Rust code)."""

    def __init__(self, error: BaseException):
        self.raised = error

    def deep_copy(self):
        return self

    def unsafe_compute_mask_ptr(self, pointer, size):
        raise self.raised

    def consume_tokens(self, token_ids):
        raise self.raised

    def is_error(self):
        return False


def test_a_matcher_that_panics_fails_its_own_request_only(compiler, tokenizer):
    good = compiler.compile(sampling(regex="(ab|cd)!"))
    outputs = StructuredOutputs()
    outputs.add("good", good)
    outputs.add("broken", Constraint("sampling.regex", BrokenMatcher(PanicException("boom")), good.vocab_size))
    masks = outputs.token_masks(["good", "broken"])
    assert [m.req_id for m in masks] == ["good"]  # computed one by one once the batch call failed
    assert masks[0].allowed == outputs.token_masks(["good"])[0].allowed
    assert outputs.advance("broken", [1]) is Progress.FAILED
    assert "boom" in outputs.error("broken")
    assert outputs.token_masks(["broken"]) == []
    assert outputs.advance("good", tokenizer.encode("ab", add_special_tokens=False)) is Progress.OPEN
    outputs.remove("broken")
    assert outputs.error("broken") == ""


def test_a_matcher_panicking_on_a_token_fails_and_ctrl_c_still_interrupts(compiler):
    vocab_size = compiler.compile(sampling(regex="a")).vocab_size
    outputs = StructuredOutputs()
    outputs.add("panics", Constraint("sampling.regex", BrokenMatcher(PanicException("bad state")), vocab_size))
    assert outputs.advance("panics", [1]) is Progress.FAILED and "bad state" in outputs.error("panics")
    outputs.add("interrupted", Constraint("sampling.regex", BrokenMatcher(KeyboardInterrupt()), vocab_size))
    with pytest.raises(KeyboardInterrupt):
        outputs.advance("interrupted", [1])


def test_masks_allow_exactly_the_tokens_that_keep_a_match(compiler, tokenizer):
    """The mask against a brute-force reference: token t is allowed iff prefix + t is still a
    prefix of some match of the regex (checked with Python's `re` over the whole vocabulary)."""
    outputs = StructuredOutputs()
    outputs.add("r", compiler.compile(sampling(regex="(cat|cow|dog)s?")))
    outputs.advance("r", tokenizer.encode("c", add_special_tokens=False))
    allowed = unpack_allowed(outputs.token_masks(["r"]), tokenizer.vocab_size)[0].bool()
    matches = ["cat", "cow", "dog", "cats", "cows", "dogs"]
    expected = set()
    for token in range(tokenizer.vocab_size):
        piece = tokenizer.decode([token], skip_special_tokens=False)
        if piece and any(m.startswith("c" + piece) for m in matches):
            expected.add(token)
    assert set(torch.nonzero(allowed).flatten().tolist()) == expected


# The worker's side: unpacking and masking against a plain Python loop over the bits.

def naive_allowed(mask: bytes, vocab_size: int) -> list[bool]:
    return [t < 8 * len(mask) and bool(mask[t // 8] >> (t % 8) & 1) for t in range(vocab_size)]


def test_unpacking_follows_the_documented_bit_order():
    generator = torch.Generator().manual_seed(0)
    masks = [TokenMask("a", bytes(torch.randint(0, 256, (5,), generator=generator).tolist())),
             TokenMask("b", bytes([0b10000001, 0b00000010]))]  # shorter: tokens 16+ disallowed
    for vocab_size in (37, 40, 44):  # inside, at and past the longest mask's bits
        allowed = unpack_allowed(masks, vocab_size)
        assert allowed.shape == (2, vocab_size) and allowed.dtype == torch.uint8
        for row, mask in enumerate(masks):
            assert [bool(x) for x in allowed[row].tolist()] == naive_allowed(mask.allowed, vocab_size)


def test_the_accelerator_unpacking_equals_the_host_one():
    packed = torch.randint(0, 256, (3, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    bits = unpack_bits(packed)  # the op an accelerator runs, here on the CPU
    for row in range(3):
        assert [bool(x) for x in bits[row].tolist()] == naive_allowed(bytes(packed[row].tolist()), 56)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masking_touches_only_the_masked_rows_and_only_disallowed_tokens(dtype):
    logits = (torch.randn(4, 20) * 1000).to(dtype)  # large logits stay exact too
    before = logits.clone()
    masks = [TokenMask("z", bytes([0b00000110, 0, 0b00001000])),  # tokens 1, 2 and 19
             TokenMask("x", bytes([0b00000001]))]  # token 0 only: the mask is shorter than the vocab
    out = apply_token_masks(logits, ["x", "y", "z", "w"], masks)
    assert out is logits
    assert torch.equal(out[[1, 3]], before[[1, 3]])
    for row, kept in ((2, [1, 2, 19]), (0, [0])):
        expected = torch.full((20,), float("-inf"), dtype=dtype)
        expected[kept] = before[row, kept]
        assert torch.equal(out[row], expected)
    assert apply_token_masks(before, ["x"], []) is before


def test_a_mask_for_a_row_that_does_not_sample_is_refused():
    with pytest.raises(ValueError, match="sample nothing"):
        apply_token_masks(torch.zeros(1, 8), ["x"], [TokenMask("y", b"\xff")])


# The plan: masks only for constrained requests that sample in the step.

def test_masks_go_only_to_constrained_requests_that_sample(compiler):
    config = SchedulerConfig(num_kv_blocks=32, max_model_len=256, block_size=4, max_num_seqs=4,
                             max_num_batched_tokens=12)
    scheduler, worker, outputs = Scheduler(config), NullRunner(), StructuredOutputs()
    constraint = compiler.compile(sampling(regex="[a-z]+"))
    for req_id, num_prompt_tokens in (("long", 20), ("short", 3), ("free", 3)):
        scheduler.add_request(Request(req_id, list(range(num_prompt_tokens)), SamplingParams(max_tokens=4, ignore_eos=True)))
    outputs.add("long", constraint)
    outputs.add("short", constraint)
    masked_per_step = []
    for _ in range(3):
        plan = scheduler.schedule()
        outputs.attach_masks(plan, scheduler.requests)
        masked_per_step.append(sorted(m.req_id for m in plan.token_masks))
        result = worker.execute(plan)
        assert {m.req_id for m in plan.token_masks} <= set(result.req_ids)  # each masked row samples
        scheduler.update_from_output(plan, result)
    # Step 0: "long" computes 12 of its 20 prompt tokens and samples nothing; step 1 finishes it.
    assert masked_per_step == [[], ["long", "short"], ["long", "short"]]


# The engine: a worker that honours the masks ends requests when the output is complete; one that
# ignores them fails that request alone, and the engine keeps serving.

class InProcessWorkers:
    """Enough of WorkerGroup for the engine: runs each plan on a NullRunner, optionally picking
    each masked row's token from its mask (the lowest allowed id) as a masking worker would."""

    num_deaths, is_registered, dead_reason, lost_since = 0, True, None, None  # never dies

    def __init__(self, honour_masks: bool):
        self.runner, self.honour_masks = NullRunner(), honour_masks
        self.plans: list[StepPlan] = []

    async def execute(self, plan: StepPlan) -> protocol.StepResult:
        self.plans.append(plan)
        result = self.runner.execute(plan)
        if self.honour_masks:
            lowest = {m.req_id: int(torch.nonzero(unpack_allowed([m], 8 * len(m.allowed))[0])[0]) for m in plan.token_masks}
            result.token_ids = [lowest.get(r, t) for r, t in zip(result.req_ids, result.token_ids)]
        await asyncio.sleep(0)
        return result


def parsed_request(tokenizer, max_tokens: int = 16) -> ParsedRequest:
    return ParsedRequest("", tokenizer.encode("hi"), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def run_engine(tokenizer, compiler, honour_masks: bool, regex: str):
    config = SchedulerConfig(num_kv_blocks=64, max_model_len=256, block_size=4)
    workers = InProcessWorkers(honour_masks)
    engine = Engine(Scheduler(config), workers, tokenizer)
    engine.start()
    try:
        constrained = engine.add_request(parsed_request(tokenizer), compiler.compile(sampling(regex=regex)))
        free = engine.add_request(parsed_request(tokenizer, max_tokens=5))
        results = {}
        for name, stream in (("constrained", constrained), ("free", free)):
            try:
                events = [e async for e in stream.events()]
                results[name] = ("".join(e.text for e in events), events[-1].status)
            except EngineError as error:
                results[name] = error
        assert await engine.wait_idle(5)
        return results, engine, workers
    finally:
        await engine.stop()


async def test_engine_finishes_a_request_when_its_output_is_complete(tokenizer, compiler):
    results, engine, workers = await run_engine(tokenizer, compiler, honour_masks=True, regex="(ab|cd)!")
    assert results["constrained"] == ("ab!", RequestStatus.FINISHED_STOPPED)
    assert results["free"][1] == RequestStatus.FINISHED_LENGTH
    assert len(engine.structured) == 0
    assert all(len(p.token_masks) <= 1 for p in workers.plans)


async def test_engine_fails_only_the_request_whose_token_breaks_its_constraint(tokenizer, compiler):
    # The null worker's token decodes to letters that "[0-9]+" forbids.
    results, engine, _ = await run_engine(tokenizer, compiler, honour_masks=False, regex="[0-9]+")
    assert isinstance(results["constrained"], EngineError)
    assert results["constrained"].kind is ErrorKind.INTERNAL
    assert "structured output failed" in str(results["constrained"])
    assert results["free"][1] == RequestStatus.FINISHED_LENGTH
    assert engine.dead_reason is None and len(engine.structured) == 0


# The gateway: OpenAI's and vLLM's parameters onto the proto's oneof.

def chat(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **extra})


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("extra, field, value", [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json_schema", SCHEMA),
    ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema", SCHEMA),
    ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
    ({"structured_outputs": {"grammar": "start: \"x\""}}, "grammar", "start: \"x\""),
    ({"structured_outputs": {"choice": ["yes", "no \"way\""]}}, "grammar", 'start: "yes" | "no \\"way\\""'),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
    ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
    ({"guided_regex": "b+"}, "regex", "b+"),
    ({"guided_grammar": "start: \"y\""}, "grammar", "start: \"y\""),
    ({"guided_choice": ["a"]}, "grammar", 'start: "a"'),
    ({"guided_json": False}, "json_schema", False),  # a schema nothing matches: the server refuses it
    ({"structured_outputs": {"json": True}}, "json_schema", True),
])
def test_gateway_maps_each_parameter_to_one_proto_field(extra, field, value):
    for request in (chat_request(chat(**extra), "id"),
                    completion_request(CompletionRequest.model_validate({"prompt": "x", **extra}), "id")):
        assert request.sampling.WhichOneof("structured") == field
        got = getattr(request.sampling, field)
        assert (json.loads(got) if field == "json_schema" else got) == value


def test_gateway_leaves_text_format_unconstrained():
    assert chat_request(chat(response_format={"type": "text"}), "id").sampling.WhichOneof("structured") is None
    assert chat_request(chat(), "id").sampling.WhichOneof("structured") is None


def test_gateway_refuses_two_constraints():
    body = chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"})
    with pytest.raises(OpenAIError) as caught:
        chat_request(body, "id")
    assert caught.value.status == 400 and caught.value.param == "structured_outputs"


@pytest.fixture(scope="module")
def http():
    with TestClient(create_app(GatewayConfig(target="127.0.0.1:1"))) as client:  # no server: 503 if reached
        yield client


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # no json_schema
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema.name"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"guided_choice": []}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_gateway_rejects_malformed_parameters_itself(http, extra, param):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hi"})):
        response = http.post(path, json={**body, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_gateway_names_the_parameter_the_server_refused():
    error = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                 details="sampling.json_schema: not valid JSON")
    assert from_rpc_error(error, gateway_structured.renames(chat(response_format={"type": "json_object"}))).param == "json_schema"
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert from_rpc_error(error, gateway_structured.renames(body)).param == "response_format"
    assert from_rpc_error(error, gateway_structured.renames(chat(guided_json="{"))).param == "guided_json"
    assert from_rpc_error(error, gateway_structured.renames(chat(structured_outputs={"json": "{"}))).param == "structured_outputs"
