"""Incremental detokenization: streamed pieces join to the full decode; stop strings never leak."""

import random

import pytest

from scheduler_svc.detokenizer import IncrementalDetokenizer
from scheduler_svc.tokenizer import ModelTokenizer

pytestmark = pytest.mark.model

SAMPLES = [
    "Plain ASCII text, with punctuation!",
    "Multibyte: héllo wörld, 日本語のテキスト, emoji 😀🎉 and more",
    "  spaces   and\nnewlines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> ModelTokenizer:
    return ModelTokenizer(model_dir)


def stream(tokenizer, prompt_ids, output_ids, stop, sizes):
    detok = IncrementalDetokenizer(tokenizer.tokenizer, prompt_ids, stop)
    pieces, position = [], 0
    for size in sizes:
        chunk = detok.add_tokens(output_ids[position:position + size])
        position += size
        pieces.append(chunk.text)
        if chunk.stopped:
            return pieces, True
    pieces.append(detok.flush())
    return pieces, False


@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("Prefix:")
    output_ids = tokenizer.encode(text)
    rng = random.Random()
    sizes = [rng.randint(1, 3) for _ in range(len(output_ids))]
    pieces, stopped = stream(tokenizer, prompt_ids, output_ids, [], sizes)
    assert not stopped
    full = tokenizer.decode(prompt_ids + output_ids)
    assert "".join(pieces) == full[len(tokenizer.decode(prompt_ids)):]
    assert all("\ufffd" not in piece for piece in pieces), pieces


def test_random_byte_tokens_never_emit_half_characters(tokenizer):
    output_ids = tokenizer.encode("日本語😀é" * 5)
    pieces, _ = stream(tokenizer, [], output_ids, [], [1] * len(output_ids))
    assert "".join(pieces) == tokenizer.decode(output_ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_truncates_and_is_never_sent(tokenizer):
    output_ids = tokenizer.encode(" one, two, three, four, five")
    pieces, stopped = stream(tokenizer, [], output_ids, [", fo", "zzz"], [1] * len(output_ids))
    assert stopped
    assert "".join(pieces) == " one, two, three"
    streamed = ""
    for piece in pieces:
        streamed += piece
        assert ", fo" not in streamed


def test_text_that_only_starts_a_stop_string_is_released_at_the_end(tokenizer):
    output_ids = tokenizer.encode(" the end ST")
    pieces, stopped = stream(tokenizer, [], output_ids, ["STOP"], [1] * len(output_ids))
    assert not stopped
    assert "".join(pieces) == " the end ST"
    assert not "".join(pieces[:-1]).endswith("ST"), "a possible stop prefix was released early"
