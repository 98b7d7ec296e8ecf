"""Incremental detokenization with stop strings, safe for streaming UTF-8.

`tokenizers.decoders.DecodeStream` turns one token at a time into text and holds back bytes that
do not yet form a whole character. On top of it, `IncrementalDetokenizer` holds back any tail of
the text that could still become a stop string, so a client never receives text that is later
taken back.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


@dataclass(slots=True)
class DetokenizedChunk:
    text: str  # new text, safe to send
    stopped: bool  # a stop string matched; text ends just before it


class IncrementalDetokenizer:
    """Per-request detokenizer state. Call `add_tokens` with each step's new tokens."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._held = ""  # decoded text not yet released (could be the start of a stop string)
        self._prime(prompt_token_ids)

    def _prime(self, prompt_token_ids: list[int]) -> None:
        # Decoding depends on the preceding tokens (leading spaces, byte fallback); feeding the
        # prompt's tail lets the first generated token decode as it would inside the full text.
        for token_id in prompt_token_ids[-4:]:
            self._stream.step(self._tokenizer, token_id)

    def add_tokens(self, token_ids: list[int]) -> DetokenizedChunk:
        for token_id in token_ids:
            piece = self._stream.step(self._tokenizer, token_id)
            if piece:
                self._held += piece
        return self._release()

    def flush(self) -> str:
        """The text still held back, at the end of the request (no stop string matched)."""
        text, self._held = self._held, ""
        return text

    def _release(self) -> DetokenizedChunk:
        if not self._stop:
            text, self._held = self._held, ""
            return DetokenizedChunk(text, stopped=False)
        match = _first_stop(self._held, self._stop)
        if match is not None:
            text, self._held = self._held[:match], ""
            return DetokenizedChunk(text, stopped=True)
        keep = _longest_partial_stop(self._held, self._stop, self._max_stop_len)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return DetokenizedChunk(text, stopped=False)


def _first_stop(text: str, stop: list[str]) -> int | None:
    positions = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(positions) if positions else None


def _longest_partial_stop(text: str, stop: list[str], max_len: int) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    for length in range(min(len(text), max_len - 1), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stop):
            return length
    return 0
