"""The scheduler<->worker messages round-trip through msgpack and reject foreign frames."""

import msgspec
import pytest

from scheduler_svc import protocol
from scheduler_svc.protocol import CachedRequest, NewRequest, SamplingOptions, StepPlan, StepResult, WorkerHello


def test_plan_round_trips():
    plan = StepPlan(
        step_id=7,
        new_requests=[NewRequest("a", [1, 2, 3], [4, 9], 0, 3, SamplingOptions(0.7, 0.9, 40, 123))],
        cached_requests=[CachedRequest("b", [11], 16, 1)],
        finished_req_ids=["c"],
    )
    decoded = protocol.decode_for_worker(protocol.encode(plan))
    assert decoded == plan and decoded.num_scheduled_tokens == 4


def test_worker_messages_round_trip():
    hello = WorkerHello(protocol.PROTOCOL_VERSION, 0, 1, 42, 100, 16, "abc", 8192, 49152, "cpu", "float32")
    result = StepResult(3, 0, ["a", "b"], [5, 6], 0.01)
    for message in (hello, result):
        assert protocol.decode_for_scheduler(protocol.encode(message)) == message


@pytest.mark.parametrize("frame", [b"", b"\x93\x01\x02\x03", msgspec.msgpack.encode({"x": 1}),
                                   msgspec.msgpack.encode(["result", "not-an-int"])])
def test_garbage_is_rejected(frame):
    with pytest.raises(msgspec.DecodeError):
        protocol.decode_for_scheduler(frame)


def test_worker_does_not_accept_worker_messages():
    hello = WorkerHello(protocol.PROTOCOL_VERSION, 0, 1, 42, 100, 16, "abc", 8192, 49152, "cpu", "float32")
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_for_worker(protocol.encode(hello))
