"""Structured outputs in OpenAI's and vLLM's words, mapped onto SamplingParams' `structured` oneof.

OpenAI: `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", ...}} ({"type": "text"} is the default, no constraint). vLLM's extra body:
`structured_outputs` with one of `json` (a schema, as an object or as text), `regex`, `grammar`,
`choice` (a list of strings) or `json_object`, and the older `guided_json`, `guided_regex`,
`guided_grammar`, `guided_choice`. One request takes one constraint. The server compiles it; its
errors name the proto field, which `renames` maps back to the parameter the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway_svc.errors import OpenAIError
from omnibus.v1 import generation_pb2 as pb

# vLLM's older names -> the StructuredOutputs field each stands for.
_LEGACY_NAMES = {"guided_json": "json_", "guided_regex": "regex", "guided_grammar": "grammar", "guided_choice": "choice"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None  # we always enforce the schema


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of its fields."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name, value in (("json", self.json_), ("regex", self.regex), ("grammar", self.grammar),
                                          ("choice", self.choice)) if value is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"exactly one of json, regex, grammar, choice, json_object is required (got {given or 'none'})")
        return self


@dataclass(slots=True, frozen=True)
class _Constraint:
    param: str  # the parameter the client sent, for error messages
    kind: str  # the SamplingParams field: json_schema, regex, grammar or json_object
    value: str | bool


def apply(body, sampling: pb.SamplingParams) -> None:
    """Set `sampling`'s constraint from `body`. Raises OpenAIError (400) when two parameters
    constrain the output."""
    constraint = _constraint(body)
    if constraint is not None:
        setattr(sampling, constraint.kind, constraint.value)


def renames(body) -> dict[str, str]:
    """The server's name for the constraint's field -> the parameter the client sent it in."""
    constraint = _constraint(body)
    return {} if constraint is None else {f"sampling.{constraint.kind}": constraint.param}


def check(body) -> None:
    """Raise OpenAIError (400) when two parameters constrain the output."""
    _constraint(body)


def _constraint(body) -> _Constraint | None:
    constraints = _constraints(body)
    if len(constraints) > 1:
        names = ", ".join(c.param for c in constraints)
        raise OpenAIError(400, f"only one structured-output constraint per request, got {names}", param=constraints[1].param)
    return constraints[0] if constraints else None


def _constraints(body) -> list[_Constraint]:
    found = []
    response_format: ResponseFormat | None = body.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(_Constraint("response_format", "json_object", True))
    elif response_format is not None and response_format.type == "json_schema":
        found.append(_Constraint("response_format", "json_schema", _schema_text(response_format.json_schema.json_schema)))
    if body.structured_outputs is not None:
        found.append(_from_vllm("structured_outputs", body.structured_outputs))
    for name, field in _LEGACY_NAMES.items():
        value = getattr(body, name)
        if value is not None:  # already validated as GenerateBody's field
            found.append(_from_vllm(name, StructuredOutputs.model_construct(**{field: value})))
    return found


def _from_vllm(param: str, outputs: StructuredOutputs) -> _Constraint:
    if outputs.json_ is not None:
        return _Constraint(param, "json_schema", _schema_text(outputs.json_))
    if outputs.regex is not None:
        return _Constraint(param, "regex", outputs.regex)
    if outputs.grammar is not None:
        return _Constraint(param, "grammar", outputs.grammar)
    if outputs.choice is not None:
        # A Lark grammar whose strings are JSON literals, as llguidance writes a choice.
        return _Constraint(param, "grammar", "start: " + " | ".join(json.dumps(c) for c in outputs.choice))
    return _Constraint(param, "json_object", True)


def _schema_text(schema: dict | bool | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)
