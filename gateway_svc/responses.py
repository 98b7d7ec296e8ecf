"""OpenAI response objects for both endpoints: the whole object, and the chunks of a stream.

A stream is `opening()` chunks, `delta()` chunks as text arrives, one `finish()` chunk per choice
carrying its finish_reason, then (with stream_options.include_usage) a `usage_chunk()` with no
choices. With n > 1 the choices' chunks interleave, each naming its `index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway_svc.logprobs import CompletionLogprobs, chat_logprobs
from gateway_svc.translate import Generation, Generations, usage
from omnibus.v1 import generation_pb2 as pb


@dataclass(slots=True)
class _Format:
    id: str
    model: str
    created: int
    return_token_ids: bool = False
    n: int = 1
    logprobs: bool = False  # the request asked for logprobs: choices carry them

    def _object(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, index: int, token_ids: list[int], finish_reason: str | None, logprobs: dict | None,
                **content) -> dict:
        choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice


@dataclass(slots=True)
class CompletionFormat(_Format):
    """`text_completion` objects (POST /v1/completions); chunks have the same object name."""

    _offsets: dict[int, CompletionLogprobs] = field(default_factory=dict)  # per choice, across chunks

    def full(self, generations: Generations) -> dict:
        choices = [
            self._choice(index, g.token_ids, g.finish_reason, self._logprobs(g.logprobs, CompletionLogprobs()),
                         text="".join(g.text))
            for index, g in enumerate(generations.in_order())
        ]
        return self._object("text_completion", choices, usage(generations.usage()))

    def opening(self) -> list[dict]:
        return []

    def delta(self, response: pb.GenerateResponse) -> dict:
        offsets = self._offsets.setdefault(response.index, CompletionLogprobs())
        choice = self._choice(response.index, list(response.token_ids), None,
                              self._logprobs(list(response.logprobs), offsets), text=response.text)
        return self._object("text_completion", [choice])

    def finish(self, index: int, finish_reason: str) -> dict:
        return self._object("text_completion", [self._choice(index, [], finish_reason, None, text="")])

    def usage_chunk(self, message: pb.Usage) -> dict:
        return self._object("text_completion", [], usage(message))

    def _logprobs(self, entries: list[pb.TokenLogprobs], offsets: CompletionLogprobs) -> dict | None:
        return offsets.format(entries) if self.logprobs else None


@dataclass(slots=True)
class ChatFormat(_Format):
    """`chat.completion` objects and `chat.completion.chunk` chunks (POST /v1/chat/completions)."""

    def full(self, generations: Generations) -> dict:
        choices = [self._full_choice(index, g) for index, g in enumerate(generations.in_order())]
        return self._object("chat.completion", choices, usage(generations.usage()))

    def opening(self) -> list[dict]:
        return [self._chunk(index, {"role": "assistant", "content": ""}, [], None, None) for index in range(self.n)]

    def delta(self, response: pb.GenerateResponse) -> dict:
        logprobs = chat_logprobs(list(response.logprobs)) if self.logprobs else None
        return self._chunk(response.index, {"content": response.text}, list(response.token_ids), None, logprobs)

    def finish(self, index: int, finish_reason: str) -> dict:
        return self._chunk(index, {}, [], finish_reason, None)

    def usage_chunk(self, message: pb.Usage) -> dict:
        return self._object("chat.completion.chunk", [], usage(message))

    def _full_choice(self, index: int, generation: Generation) -> dict:
        message = {"role": "assistant", "content": "".join(generation.text)}
        logprobs = chat_logprobs(generation.logprobs) if self.logprobs else None
        return self._choice(index, generation.token_ids, generation.finish_reason, logprobs, message=message)

    def _chunk(self, index: int, delta: dict, token_ids: list[int], finish_reason: str | None,
               logprobs: dict | None) -> dict:
        return self._object("chat.completion.chunk", [self._choice(index, token_ids, finish_reason, logprobs,
                                                                   delta=delta)])


ResponseFormat = CompletionFormat | ChatFormat
