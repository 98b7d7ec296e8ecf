"""Incremental detokenization: streamed pieces join to the full decode; stop strings never leak.

Most tests use a tiny hand-built tokenizer (a `tokenizers.Tokenizer` whose tokens are the
characters and words listed below, with byte fallback and one special token), so the text each
token adds is known exactly and every release can be checked against a naive rule: after each
step the client has received the text so far minus its longest tail that could still grow into a
stop string. The last tests run the default model's real tokenizer (marked `model`).
"""

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models

from scheduler_svc.detokenizer import IncrementalDetokenizer
from scheduler_svc.tokenizer import ModelTokenizer

SAMPLES = [
    "Plain ASCII text, with punctuation!",
    "Multibyte: héllo wörld, 日本語のテキスト, emoji 😀🎉 and more",
    "  spaces   and\nnewlines\n\n",
]
IM_END = "<|im_end|>"
WORDS = [" one", " two", " three", " four", ", f", "ur"]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    """Tokens: printable ASCII characters, a few words, <0x00>..<0xFF> and <|im_end|>."""
    pieces = ["<unk>", *map(chr, range(32, 127)), *WORDS, *(f"<0x{b:02X}>" for b in range(256))]
    tokenizer = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(IM_END, special=True)])
    return tokenizer


def ids(tokenizer: Tokenizer, *pieces: str) -> list[int]:
    return [tokenizer.token_to_id(piece) for piece in pieces]


def chars(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per character."""
    return ids(tokenizer, *text)


def expected_release(text: str, stop: list[str]) -> str:
    """`text` less its longest tail that is a proper prefix of a stop string (written naively)."""
    held = 0
    for s in stop:
        for length in range(1, len(s)):
            if text.endswith(s[:length]):
                held = max(held, length)
    return text[: len(text) - held]


def expected_stop(text: str, stop: list[str]) -> int | None:
    """Where the earliest stop string in `text` starts, or None."""
    starts = [text.find(s) for s in stop if s and s in text]
    return min(starts) if starts else None


def check_stream(tokenizer: Tokenizer, steps: list[list[int]], texts: list[str], stop: list[str]):
    """Feed `steps` (each step's tokens add the matching entry of `texts`) and check every
    release, the stop and the flush against the naive rules."""
    detok = IncrementalDetokenizer(tokenizer, [], stop)
    full, streamed = "", ""
    for token_ids, text in zip(steps, texts, strict=True):
        full += text
        chunk = detok.add_tokens(token_ids)
        streamed += chunk.text
        start = expected_stop(full, stop)
        if start is not None:
            assert chunk.stopped is True and streamed == full[:start], (full, stop)
            return streamed
        assert chunk.stopped is False
        assert streamed == expected_release(full, stop), (full, stop)
    assert streamed + detok.flush() == full
    return streamed


@pytest.mark.parametrize(
    "text, stop",
    [
        (" one, two, three, four, five", [", fo", "zzz"]),  # ", f" must be held, then matches
        ("xx STO STOP yy", ["STOP"]),  # a near miss is released once it cannot match
        ("xabcd", ["bc", "abc"]),  # both end at "c": the earlier start wins
        ("aaab", ["aab"]),  # the match starts inside the held text
        ("abcabd, abcabx!", ["abcabx", "cab!"]),  # a long partial, broken and restarted
        ("no stop here", ["zzz", "here!"]),
        ("no stop at all", []),
        (" one, two, three", ["two", "three"]),  # stops sharing their first character
        ("xabce", ["abcd", "bc"]),  # a stop inside a longer one's partial match
    ],
)
def test_one_character_at_a_time_releases_exactly_what_cannot_start_a_stop(tiny, text, stop):
    check_stream(tiny, [[t] for t in chars(tiny, text)], list(text), stop)


def test_the_earliest_of_several_stops_in_one_step_wins(tiny):
    text = " one, two, three"
    token_ids = ids(tiny, " one", ",", " two", ",", " three")
    assert check_stream(tiny, [token_ids], [text], ["three", "two"]) == " one, "
    assert check_stream(tiny, [token_ids], [text], [", t", "o, "]) == " one"


@pytest.mark.parametrize("min_tokens, before_stop", [(0, ""), (2, ""), (3, "ab."), (5, "ab."), (6, "ab.ab."),
                                                     (9, None)])
def test_min_tokens_holds_back_stop_strings(tiny, min_tokens, before_stop):
    """"ab" ends at tokens 2, 5 and 8: a match counts once the output has min_tokens tokens (None:
    no match does, and all the text is released)."""
    detok = IncrementalDetokenizer(tiny, [], ["ab"], min_tokens)
    streamed, stopped = "", False
    for token_id in chars(tiny, "ab.ab.ab"):
        chunk = detok.add_tokens([token_id])
        streamed += chunk.text
        if chunk.stopped:
            stopped = True
            break
    if before_stop is None:
        assert not stopped and streamed + detok.flush() == "ab.ab.ab"
    else:
        assert stopped and streamed == before_stop


def test_a_stop_split_across_word_tokens(tiny):
    pieces = [" one", ", f", "o", "ur"]
    streamed = check_stream(tiny, [ids(tiny, p) for p in pieces], pieces, [", fo"])
    assert streamed == " one"


@pytest.mark.parametrize("stop", [[], ["zzz"], [""]])
def test_special_tokens_are_never_streamed(tiny, stop):
    cases = [([IM_END], ["h", "i", IM_END, "!", IM_END], "hi!"), (["a"], ["o", "k", IM_END], "ok")]
    for prompt, pieces, text in cases:
        detok = IncrementalDetokenizer(tiny, ids(tiny, *prompt), stop)
        streamed = [detok.add_tokens([t]).text for t in ids(tiny, *pieces)]
        assert "".join(streamed) + detok.flush() == text


def test_a_character_split_across_byte_tokens_is_released_whole(tiny):
    text = "é😀 ok"
    token_ids = ids(tiny, *(f"<0x{b:02X}>" for b in text.encode()))
    for stop in ([], ["😀 o!"]):
        detok = IncrementalDetokenizer(tiny, [], stop)
        pieces = [detok.add_tokens([t]).text for t in token_ids]
        assert pieces[:2] == ["", "é"] and pieces[2:5] == ["", "", ""]
        assert "".join(pieces) + detok.flush() == text


@pytest.mark.parametrize("stop", [[], ["zzz"], ["\ufffd!"]])
def test_a_character_cut_short_is_flushed_as_replacement_characters(tiny, stop):
    cut = "😀".encode()[:2]  # the emoji's last two bytes never came
    token_ids = ids(tiny, "o", "k", " ", *(f"<0x{b:02X}>" for b in "é".encode() + cut), IM_END)
    detok = IncrementalDetokenizer(tiny, ids(tiny, "a"), stop)
    pieces = [detok.add_tokens([t]).text for t in token_ids]
    assert "".join(pieces) == "ok é"
    # What Hugging Face's decode makes of the cut bytes: one U+FFFD per byte token.
    assert detok.flush() == tiny.decode(token_ids[-3:]) == "\ufffd\ufffd"
    assert detok.flush() == ""  # nothing is held any more


@pytest.mark.parametrize("num_prompt_tokens", [1, 4, 6])
def test_the_first_token_decodes_as_inside_the_full_text(num_prompt_tokens):
    # SentencePiece-style words: decoded alone, "▁world" loses its space; after a prompt, it keeps it.
    words = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    prompt, output = [1] * num_prompt_tokens, [2, 3]
    detok = IncrementalDetokenizer(tokenizer, prompt, ["zzz"])
    streamed = "".join(detok.add_tokens([t]).text for t in output) + detok.flush()
    full = tokenizer.decode(prompt + output)
    assert streamed == full[len(tokenizer.decode(prompt)):] == " world!"


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


@pytest.mark.model
@pytest.mark.parametrize("text", SAMPLES)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("Prefix:")
    output_ids = tokenizer.encode(text)
    rng = random.Random(len(text))  # fixed: a failure replays
    sizes = [rng.randint(1, 3) for _ in range(len(output_ids))]
    pieces, stopped = stream(tokenizer, prompt_ids, output_ids, [], sizes)
    assert not stopped
    full = tokenizer.decode(prompt_ids + output_ids)
    assert "".join(pieces) == full[len(tokenizer.decode(prompt_ids)):]
    assert all("\ufffd" not in piece for piece in pieces), pieces


@pytest.mark.model
def test_random_byte_tokens_never_emit_half_characters(tokenizer):
    output_ids = tokenizer.encode("日本語😀é" * 5)
    pieces, _ = stream(tokenizer, [], output_ids, [], [1] * len(output_ids))
    assert "".join(pieces) == tokenizer.decode(output_ids)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.model
def test_stop_string_truncates_and_is_never_sent(tokenizer):
    output_ids = tokenizer.encode(" one, two, three, four, five")
    pieces, stopped = stream(tokenizer, [], output_ids, [", fo", "zzz"], [1] * len(output_ids))
    assert stopped
    assert "".join(pieces) == " one, two, three"
    assert pieces[-1] == "", "the ',' before ' four' was held back, then dropped with the stop"


@pytest.mark.model
def test_the_chat_end_token_is_not_streamed(tokenizer):
    im_end = tokenizer.tokenizer.token_to_id(IM_END)
    output_ids = tokenizer.encode(" Paris.") + [im_end]
    for stop in ([], ["zzz"]):
        pieces, _ = stream(tokenizer, [], output_ids, stop, [1] * len(output_ids))
        assert "".join(pieces) == " Paris."


@pytest.mark.model
def test_text_that_only_starts_a_stop_string_is_released_at_the_end(tokenizer):
    output_ids = tokenizer.encode(" the end ST")
    pieces, stopped = stream(tokenizer, [], output_ids, ["STOP"], [1] * len(output_ids))
    assert not stopped
    assert "".join(pieces) == " the end ST"
    assert not "".join(pieces[:-1]).endswith("ST"), "a possible stop prefix was released early"
