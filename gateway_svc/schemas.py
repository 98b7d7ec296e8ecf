"""Request bodies of the OpenAI endpoints we serve, as pydantic models.

Unknown fields are rejected with a 400 naming them rather than ignored: a client that sends
a parameter we do not know should learn that it had no effect. The OpenAI parameters we do not implement
are declared and accepted only at the value that means "off" (`UNSUPPORTED`). Range checks that
the server makes anyway (temperature, top_p, context length) are left to it, so they live in one
place; here we check types, what the proto could not carry (negative or oversized integers), and
max_tokens >= 1 (OpenAI's own bound).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from gateway_svc.errors import OpenAIError
from gateway_svc import structured_output
from gateway_svc.structured_output import ResponseFormat, StructuredOutputs

T = TypeVar("T")
UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
OnePrompt = Annotated[list[T], Field(min_length=1, max_length=1)]  # OpenAI's batch form, of one prompt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class GenerateBody(_Body):
    """Fields both endpoints share: OpenAI's, then Omnibus extensions (the openai client sends
    those through `extra_body`)."""

    model: str | None = None  # must name the served model; omitted: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)  # omitted: the server's default
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: list[str] = []  # a string or a list of strings
    user: str | None = None  # OpenAI's end-user id: sent as the request's tenant (fair share)

    n: int | None = Field(None, ge=1, le=UINT32_MAX)  # independent samples (the server bounds it)
    # Range checks of these are the server's, as for temperature.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's form) -> bias

    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = []
    priority: int = Field(0, ge=INT32_MIN, le=INT32_MAX)  # lower runs first
    cache_salt: str = ""  # prefix-cache isolation between tenants
    return_token_ids: bool = False  # add each choice's token ids (vLLM's extension)
    # Structured outputs (structured_output.py): OpenAI's, vLLM's, and vLLM's older names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    # A plain validator's field would be untyped in /openapi.json: name what it accepts.
    @field_validator("stop", mode="plain", json_schema_input_type=str | list[str] | None)
    @classmethod
    def _stop_list(cls, stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            return [stop]
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            return stop
        raise PydanticCustomError("stop", "must be a string or a list of strings")

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in logit_bias or {}:
            if not (key.isascii() and key.isdigit() and int(key) <= UINT32_MAX):
                raise PydanticCustomError("logit_bias", "keys must be token ids, got {key}", {"key": repr(key)})
        return logit_bias

    def check(self) -> None:
        """Reject what per-field validation cannot see: unsupported values, misplaced options."""
        for name, allowed in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise OpenAIError(400, f"{name}: {value!r} is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        structured_output.check(self)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerateBody):
    prompt: str | list[int]  # text, or token ids

    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=UINT32_MAX)  # top alternatives per token (the server bounds it)
    echo: bool = False
    suffix: str | None = None
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **GenerateBody.UNSUPPORTED, "best_of": (None, 1), "echo": (False,), "suffix": (None, ""),
    }

    @field_validator("prompt", mode="plain", json_schema_input_type=str | TokenIds | OnePrompt[str] | OnePrompt[TokenIds])
    @classmethod
    def _one_prompt(cls, prompt: object) -> str | list[int]:
        # Checked by hand: pydantic's errors for a union name its members, not the problem.
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # OpenAI's batch form, with one prompt
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise PydanticCustomError("prompt", "must be a string or a non-empty list of token ids")
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= UINT32_MAX for t in prompt):
            return prompt
        if all(isinstance(p, (str, list)) for p in prompt):
            raise PydanticCustomError(
                "prompt_batch", "{n} prompts in one request; this server takes one per request", {"n": len(prompt)}
            )
        raise PydanticCustomError("prompt", "must be a string or a list of token ids in [0, 2**32)")


class TextPart(TypedDict):
    """One part of a message's content list: text only."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str  # a string, or a list of text parts joined by newlines (as vLLM does)

    @field_validator("content", mode="plain", json_schema_input_type=str | list[TextPart])
    @classmethod
    def _text(cls, content: object) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        ):
            return "\n".join(part["text"] for part in content)
        raise PydanticCustomError("content", "must be a string or a list of parts of type 'text' (text only)")


class ChatCompletionRequest(GenerateBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)  # OpenAI's newer max_tokens

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=UINT32_MAX)  # needs logprobs (the server bounds it)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs: only allowed when logprobs is true", param="top_logprobs")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
