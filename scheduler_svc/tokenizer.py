"""The scheduler's tokenizer: Hugging Face `tokenizers` plus the model's Jinja chat template.

The scheduler must stay free of torch and transformers, so this reads the tokenizer files of a
prepared model directory directly (tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json) and renders chat templates the way transformers does: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


@dataclass(slots=True, frozen=True)
class ChatTurn:
    role: str
    content: str


class ModelTokenizer:
    """Encodes prompts, renders chat conversations and knows the model's end-of-sequence ids."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = _read_chat_template(model_dir, config)
        self.eos_token_ids = self._find_eos_ids(model_dir)
        self._template = None
        if self.chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, turns: list[ChatTurn], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; ValueError when there is no template."""
        if self._template is None:
            raise ValueError("this model has no chat template; send `prompt` instead of `messages`")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, turns: list[ChatTurn]) -> list[int]:
        # The template already writes the special tokens, as transformers' apply_chat_template does.
        return self.encode(self.render_chat(turns), add_special_tokens=False)

    def _find_eos_ids(self, model_dir: Path) -> frozenset[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.eos_token is not None:
            token_id = self.tokenizer.token_to_id(self.eos_token)
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_chat_template(model_dir: Path, config: dict) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _raise_template_error(message: str):
    raise ValueError(f"chat template error: {message}")
