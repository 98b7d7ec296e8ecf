"""Issue 16, item 4: hypothesis-generated GenerateRequests against a real server (the default model).

Every answer is a stream that finishes every sample, or a refusal the client can act on
(INVALID_ARGUMENT, OUT_OF_RANGE, RESOURCE_EXHAUSTED): never INTERNAL, UNKNOWN or a hang. After
the run the server still serves and holds no request and no KV block.
"""

from __future__ import annotations

import os
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from omnibus.v1 import generation_pb2 as pb
from tests.fuzz_support import REFUSALS, assert_unharmed
from tests.generate_request_strategies import FuzzedRequest, generate_requests

pytestmark = pytest.mark.model

# A CI-sized run; OMNIBUS_FUZZ_EXAMPLES=2000 fuzzes for longer.
MAX_EXAMPLES = int(os.environ.get("OMNIBUS_FUZZ_EXAMPLES", "50"))
STREAM_TIMEOUT_S = 60  # a hang is a failure, not a stuck suite


def check_answer(stub, request: pb.GenerateRequest) -> str:
    """What the server answered ("streamed" or the refusal's code and details), after checking it
    is allowed."""
    try:
        responses = list(stub.Generate(request, timeout=STREAM_TIMEOUT_S))
    except grpc.RpcError as error:
        answer = f"{error.code().name}: {error.details()}"
        assert error.code() in REFUSALS, answer
        return answer
    assert responses, "a stream without a single message"
    num_samples = max(request.n, 1) if "n" in pb.GenerateRequest.DESCRIPTOR.fields_by_name else 1
    finished = {getattr(r, "index", 0) for r in responses if r.finish_reason != pb.FINISH_REASON_UNSPECIFIED}
    assert finished == set(range(num_samples)), f"samples finished: {sorted(finished)} of {num_samples}"
    tokens = sum(len(r.token_ids) for r in responses)
    assert tokens <= request.sampling.max_tokens * num_samples
    return "streamed"


def test_fuzzed_generate_requests_are_streamed_or_refused_and_leave_nothing_behind(fuzz_server):
    stub = fuzz_server.stub()
    answers = Counter()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(fuzzed=generate_requests())
    def answer_is_a_stream_or_a_refusal(fuzzed: FuzzedRequest) -> None:
        answer = check_answer(stub, fuzzed.request)
        answers[answer.split(":")[0]] += 1
        if fuzzed.kind == "valid":
            assert answer == "streamed", f"a valid request was refused: {answer}"

    answer_is_a_stream_or_a_refusal()
    print(f"answers: {dict(answers)}")
    # The strategies must keep reaching the model, not only the checks in front of it.
    assert answers["streamed"] >= MAX_EXAMPLES // 5 and answers["INVALID_ARGUMENT"] >= MAX_EXAMPLES // 5, answers
    assert_unharmed(fuzz_server)
