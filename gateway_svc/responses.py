"""OpenAI response objects for both endpoints: the whole object, and the chunks of a stream.

A stream is `opening()` chunks, `delta()` chunks as text arrives, one `finish()` chunk carrying
finish_reason, then (with stream_options.include_usage) a `usage_chunk()` with no choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway_svc.translate import Generation, usage
from omnibus.v1 import generation_pb2 as pb


@dataclass(slots=True)
class _Format:
    id: str
    model: str
    created: int
    return_token_ids: bool = False

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, token_ids: list[int], finish_reason: str | None, **content) -> dict:
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice


@dataclass(slots=True)
class CompletionFormat(_Format):
    """`text_completion` objects (POST /v1/completions); chunks have the same object name."""

    def full(self, generation: Generation) -> dict:
        choice = self._choice(generation.token_ids, generation.finish_reason, text="".join(generation.text))
        return self._object("text_completion", [choice], usage(generation.usage))

    def opening(self) -> list[dict]:
        return []

    def delta(self, text: str, token_ids: list[int]) -> dict:
        return self._object("text_completion", [self._choice(token_ids, None, text=text)])

    def finish(self, finish_reason: str) -> dict:
        return self._object("text_completion", [self._choice([], finish_reason, text="")])

    def usage_chunk(self, message: pb.Usage) -> dict:
        return self._object("text_completion", [], usage(message))


@dataclass(slots=True)
class ChatFormat(_Format):
    """`chat.completion` objects and `chat.completion.chunk` chunks (POST /v1/chat/completions)."""

    def full(self, generation: Generation) -> dict:
        message = {"role": "assistant", "content": "".join(generation.text)}
        choice = self._choice(generation.token_ids, generation.finish_reason, message=message)
        return self._object("chat.completion", [choice], usage(generation.usage))

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, [], None)]

    def delta(self, text: str, token_ids: list[int]) -> dict:
        return self._chunk({"content": text}, token_ids, None)

    def finish(self, finish_reason: str) -> dict:
        return self._chunk({}, [], finish_reason)

    def usage_chunk(self, message: pb.Usage) -> dict:
        return self._object("chat.completion.chunk", [], usage(message))

    def _chunk(self, delta: dict, token_ids: list[int], finish_reason: str | None) -> dict:
        return self._object("chat.completion.chunk", [self._choice(token_ids, finish_reason, delta=delta)])


ResponseFormat = CompletionFormat | ChatFormat
