"""The scheduler's tokenizer (tokenizers + Jinja) must agree with transformers exactly."""

import pytest

from scheduler_svc.tokenizer import ChatTurn, ModelTokenizer

pytestmark = pytest.mark.model

TEXTS = ["Hello, my name is", "héllo 😀 wörld\n\ttabs", "   leading spaces", "<|im_start|>user\nhi<|im_end|>"]
CONVERSATIONS = [
    [ChatTurn("user", "What is 2+2?")],
    [ChatTurn("system", "Answer in French."), ChatTurn("user", "Hello!"), ChatTurn("assistant", "Bonjour !"),
     ChatTurn("user", "Ça va ?")],
]


@pytest.fixture(scope="module")
def tokenizers(model_dir):
    from transformers import AutoTokenizer

    return ModelTokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizers, text):
    ours, hf = tokenizers
    assert ours.encode(text) == hf(text).input_ids
    ids = hf(text).input_ids
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_chat_template_matches_transformers(tokenizers, turns):
    ours, hf = tokenizers
    messages = [{"role": t.role, "content": t.content} for t in turns]
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(turns) == expected
    assert ours.encode_chat(turns) == hf(expected, add_special_tokens=False).input_ids


def test_eos_ids(tokenizers):
    ours, hf = tokenizers
    assert hf.eos_token_id in ours.eos_token_ids
