"""The tenant on the API: field 9 of GenerateRequest, bounded and parsed; OpenAI's `user` maps to it."""

from __future__ import annotations

import pytest

from gateway_svc.schemas import ChatCompletionRequest, CompletionRequest
from gateway_svc.translate import chat_request, completion_request
from omnibus.v1 import generation_pb2 as pb
from scheduler_svc.proto_convert import InvalidArgument, ModelLimits, check_generate_request


def test_tenant_is_field_9_and_the_gateway_sends_openai_user_as_tenant():
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["tenant"].number == 9
    completion = CompletionRequest.model_validate({"prompt": "hi", "user": "alice"})
    assert completion_request(completion, "id").tenant == "alice"
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "user": "bob"})
    assert chat_request(chat, "id").tenant == "bob"
    assert completion_request(CompletionRequest.model_validate({"prompt": "hi"}), "id").tenant == ""


def test_an_oversized_tenant_is_invalid_argument_naming_the_field():
    limits = ModelLimits(vocab_size=100, max_model_len=64, kv_capacity_tokens=640)
    check_generate_request(pb.GenerateRequest(prompt="hi", tenant="t" * 256), limits)
    with pytest.raises(InvalidArgument, match=r"^tenant: at most 256 characters, got 257$"):
        check_generate_request(pb.GenerateRequest(prompt="hi", tenant="t" * 257), limits)
