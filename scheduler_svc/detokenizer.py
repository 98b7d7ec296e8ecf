"""Incremental detokenization with stop strings, safe for streaming UTF-8.

`tokenizers.decoders.DecodeStream` turns one token at a time into text and holds back bytes that
do not yet form a whole character. On top of it, `IncrementalDetokenizer` holds back any tail of
the text that could still become a stop string, so a client never receives text that is later
taken back.

Stop strings are matched by an Aho-Corasick automaton fed each new character once: the work per
token depends on the token's characters, not on how many stop strings a request carries (this
runs on the engine's event loop, shared by every stream).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_PRIME_TOKENS = 4  # prompt tokens fed first, and the context kept to decode a flushed tail


@dataclass(slots=True)
class DetokenizedChunk:
    text: str  # new text, safe to send
    stopped: bool  # a stop string matched; text ends just before it


class StopStringMatcher:
    """Aho-Corasick automaton over stop strings, fed one character at a time.

    Its state is the longest suffix of the text fed so far that is a prefix of some stop string:
    that is the text to hold back. Building it costs the stop strings' total length, once.
    """

    def __init__(self, stop: list[str]):
        self._children: list[dict[str, int]] = [{}]
        self._fail: list[int] = [0]
        self._depth: list[int] = [0]
        self._match_len: list[int] = [0]  # the longest stop string that ends at this node; 0: none
        for s in stop:
            self._insert(s)
        self._link()
        self._node = 0

    @property
    def partial_len(self) -> int:
        """Length of the text's longest suffix that could still grow into a stop string."""
        return self._depth[self._node]

    def feed(self, text: str) -> int | None:
        """Consume `text`. Returns where the earliest-starting stop string that ends in `text`
        starts, as an index into `text` (negative: it began in text fed before), or None."""
        first = None
        for i, char in enumerate(text):
            self._node = self._next(self._node, char)
            length = self._match_len[self._node]
            if length:
                start = i + 1 - length
                first = start if first is None else min(first, start)
        return first

    def _next(self, node: int, char: str) -> int:
        while True:
            child = self._children[node].get(char)
            if child is not None:
                return child
            if node == 0:
                return 0
            node = self._fail[node]

    def _insert(self, s: str) -> None:
        node = 0
        for char in s:
            child = self._children[node].get(char)
            if child is None:
                child = len(self._children)
                self._children[node][char] = child
                self._children.append({})
                self._fail.append(0)
                self._depth.append(self._depth[node] + 1)
                self._match_len.append(0)
            node = child
        self._match_len[node] = len(s)

    def _link(self) -> None:
        # Breadth first, so a node's failure target (a shallower node) is final before its own.
        queue = list(self._children[0].values())
        for node in queue:
            for char, child in self._children[node].items():
                self._fail[child] = 0 if node == 0 else self._next(self._fail[node], char)
                if not self._match_len[child]:
                    self._match_len[child] = self._match_len[self._fail[child]]
                queue.append(child)


class IncrementalDetokenizer:
    """Per-request detokenizer state. Call `add_tokens` with each step's new tokens.

    With `min_tokens`, a stop string that ends before the output has that many tokens does not stop
    it (vLLM's rule: min_tokens holds back every stop condition); its text is released as usual.
    The count is taken per `add_tokens` call, after its tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str], min_tokens: int = 0):
        self._tokenizer = tokenizer
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._stream = DecodeStream(skip_special_tokens=True)
        stop = [s for s in stop if s]
        self._matcher = StopStringMatcher(stop) if stop else None
        self._held = ""  # decoded text not yet released (could be the start of a stop string)
        # Tokens whose bytes the stream still holds (no whole character yet), and the tokens
        # before them: enough to decode that tail as Hugging Face's decode would at the end.
        self._undecoded: list[int] = []
        self._context: list[int] = list(prompt_token_ids[-_PRIME_TOKENS:])
        self._prime(prompt_token_ids)

    def _prime(self, prompt_token_ids: list[int]) -> None:
        # Decoding depends on the preceding tokens (leading spaces, byte fallback); feeding the
        # prompt's tail lets the first generated token decode as it would inside the full text.
        for token_id in prompt_token_ids[-_PRIME_TOKENS:]:
            self._stream.step(self._tokenizer, token_id)

    def add_tokens(self, token_ids: list[int]) -> DetokenizedChunk:
        self._num_tokens += len(token_ids)
        pieces = []
        for token_id in token_ids:
            piece = self._stream.step(self._tokenizer, token_id)
            self._undecoded.append(token_id)
            if piece:
                pieces.append(piece)
                self._context = (self._context + self._undecoded)[-_PRIME_TOKENS:]
                self._undecoded = []
        return self._release("".join(pieces))

    def flush(self) -> str:
        """The text still held back, at the end of the request (no stop string matched so far),
        including a character cut short, as U+FFFD like Hugging Face's decode."""
        chunk = self._release(self._undecoded_tail())
        text, self._held = chunk.text + self._held, ""  # nothing is held after a match
        return text

    def _undecoded_tail(self) -> str:
        if not self._undecoded:
            return ""
        token_ids, self._undecoded = self._undecoded, []
        context = self._tokenizer.decode(self._context, skip_special_tokens=True)
        full = self._tokenizer.decode(self._context + token_ids, skip_special_tokens=True)
        if full.startswith(context):
            return full[len(context):]
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _release(self, new_text: str) -> DetokenizedChunk:
        """Add `new_text` to the held text and release what can no longer start a stop string."""
        if self._matcher is None:
            text, self._held = self._held + new_text, ""
            return DetokenizedChunk(text, stopped=False)
        start = self._matcher.feed(new_text)
        held = self._held + new_text
        if start is not None and self._num_tokens >= self._min_tokens:
            # The held text is exactly the matcher's partial match before this feed.
            text, self._held = held[: len(self._held) + start], ""
            return DetokenizedChunk(text, stopped=True)
        cut = len(held) - self._matcher.partial_len
        text, self._held = held[:cut], held[cut:]
        return DetokenizedChunk(text, stopped=False)
