"""Shared pieces of the hardening tests (issue 13): a tiny tokenizer directory and a paced null worker.

`write_tiny_model_dir` writes the tokenizer files a scheduler reads (tokenizer.json,
tokenizer_config.json with a chat template) for a byte-level BPE whose 256 base tokens are single
bytes, so a character of several UTF-8 bytes spans several tokens. No model hub, no weights.

`python -m tests.hardening_support --scheduler ADDR` runs a null worker (benchmarks/null_worker.py)
that takes `--step-delay-s` per step, so a server under test generates at a steady, modest pace
instead of spinning a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from benchmarks.null_worker import NULL_TOKEN_ID, null_hello, serve
from tests.server_harness import ServerThread

BOS, EOS = "<s>", "</s>"
_MERGE_CHARS = "Ġabcdefghijklmnopqrstuvwxyz0123456789"
NUM_MERGES = 800  # with the 256 bytes: ids up to 1055, so the null worker's token 1000 decodes
assert NULL_TOKEN_ID < 256 + NUM_MERGES
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(add_bos: bool = False) -> Tokenizer:
    """Byte-level BPE: one token per byte plus merges of two letters, digits or spaces."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    pairs = [(a, b) for a in _MERGE_CHARS for b in _MERGE_CHARS][:NUM_MERGES]
    for a, b in pairs:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
    return tokenizer


def write_tiny_model_dir(path: Path, add_bos: bool = False) -> Path:
    """The tokenizer files of a model directory, as the scheduler reads them."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(add_bos).save(str(path / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


class NullServerThread(ServerThread):
    """A real scheduler (gRPC server, engine, worker group) in front of the paced null worker."""

    def __init__(self, model_dir: Path, num_kv_blocks: int = 4096, max_model_len: int = 1 << 16,
                 step_delay_s: float = 0.005, **options):
        # The null worker sends no heartbeats.
        super().__init__(model_dir, num_kv_blocks, heartbeat_timeout_s=3600.0, **options)
        self.max_model_len = max_model_len
        self.step_delay_s = step_delay_s

    def _spawn(self, endpoint: str) -> list[subprocess.Popen]:
        command = [sys.executable, "-m", "tests.hardening_support", "--scheduler", endpoint,
                   "--num-kv-blocks", str(self.num_kv_blocks), "--max-model-len", str(self.max_model_len),
                   "--step-delay-s", str(self.step_delay_s), "--parent-pid", str(os.getpid())]
        root = Path(__file__).resolve().parents[1]
        self.processes = [subprocess.Popen(command, cwd=root)]
        return self.processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a paced null worker for tests")
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--num-kv-blocks", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=1 << 16)
    parser.add_argument("--step-delay-s", type=float, default=0.005)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    hello = null_hello(args.num_kv_blocks, 16, args.max_model_len)
    return serve(args.scheduler, hello, args.step_delay_s, args.parent_pid)


if __name__ == "__main__":
    raise SystemExit(main())
