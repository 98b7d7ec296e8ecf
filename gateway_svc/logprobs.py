"""Token log-probabilities in OpenAI's two shapes: the completions' parallel lists and chat's
list of token objects. Token texts come from the server (each token decoded on its own)."""

from __future__ import annotations

from dataclasses import dataclass

from omnibus.v1 import generation_pb2 as pb


@dataclass(slots=True)
class CompletionLogprobs:
    """Builds completions' `logprobs` objects; `text_offset` runs on across a stream's chunks."""

    text_offset: int = 0

    def format(self, entries: list[pb.TokenLogprobs]) -> dict:
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(entry.sampled.token)
            offsets.append(self.text_offset)
            self.text_offset += len(entry.sampled.token)
        return {
            "tokens": tokens,
            "token_logprobs": [entry.sampled.logprob for entry in entries],
            # As vLLM: the top alternatives, plus the sampled token where it is not among them.
            "top_logprobs": [
                {top.token: top.logprob for top in (*entry.top, entry.sampled)} if entry.top else None
                for entry in entries
            ],
            "text_offset": offsets,
        }


def chat_logprobs(entries: list[pb.TokenLogprobs]) -> dict:
    """Chat's `logprobs` object: {"content": [token objects], "refusal": None}."""
    return {
        "content": [{**_token(entry.sampled), "top_logprobs": [_token(top) for top in entry.top]} for entry in entries],
        "refusal": None,
    }


def _token(logprob: pb.TokenLogprob) -> dict:
    return {"token": logprob.token, "logprob": logprob.logprob, "bytes": list(logprob.token.encode("utf-8"))}
