"""The servers a test can run its assertions against: `mgrpo serve` (`EmbeddedServer`) and,
where `sglang` imports (`make test-sglang`), SGLang 0.5.23's own app through
`tests/sglang_harness.py`; and the tiny model they both serve.

A test takes a `Target` (its URL and kind) and calls `serve_only(target, why)` before an
assertion that only `mgrpo serve` can meet, saying why SGLang's app cannot.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megatron_mgrpo.rollout.embedded import EmbeddedEngine
from megatron_mgrpo.rollout.server import EmbeddedServer
from megatron_mgrpo.rollout.servers import Server
from tests.test_hf_reference import hf_model
from tests.tiny import ROOT

KW = dict(architecture="qwen2", vocab_size=40, hidden_size=64, intermediate_size=96,
          num_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
          tie_word_embeddings=True)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .+="  # one character per token id: 40

SGLANG = importlib.util.find_spec("sglang") is not None
"""SGLang imports here (`make test-sglang`): the suites also run against its own app."""


def build_model_dir(out: str, chat_template: str = None) -> str:
    """A tiny Qwen2 with a one-character-per-token tokenizer (for text prompts and stops),
    and the chat template given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_model(KW, seed=3).save_pretrained(out, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # "abc", not "a b c", whichever transformers decodes it
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


class Target:
    """A server under test: its URL, what it is, and what the tests need to know."""

    def __init__(self, url: str, kind: str, model_dir: str, server=None, proc=None):
        self.url, self.kind, self.server, self.proc = url, kind, server, proc
        with open(os.path.join(model_dir, "config.json")) as f:
            self.context_len = json.load(f)["max_position_embeddings"]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # uvicorn waits on open connections
                self.proc.kill()
                self.proc.wait(10)


def start_target(kind: str, model_dir: str, process: bool = False) -> Target:
    """`mgrpo serve` (in this process, or as a process of its own) or SGLang 0.5.23's own app
    (`tests/sglang_harness.py`, a process), on the model directory given."""
    if kind == "serve" and not process:
        from megatron_mgrpo.rollout.server import load_tokenizer

        engine = EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
        server = EmbeddedServer(engine, model_path=model_dir,
                                tokenizer=load_tokenizer(model_dir)).start()
        return Target(server.url, kind, model_dir, server=server)
    if kind == "sglang" and not SGLANG:
        pytest.skip("SGLang does not import here (make test-sglang runs this target)")
    from megatron_mgrpo.parallel import free_port

    port = free_port()
    command = (["-m", "megatron_mgrpo.cli", "serve"] if kind == "serve"
               else ["-m", "tests.sglang_harness"])
    proc = subprocess.Popen([sys.executable, *command, "--model", model_dir,
                             "--port", str(port)], cwd=ROOT)
    target = Target(f"http://127.0.0.1:{port}", kind, model_dir, proc=proc)
    try:
        Server(target.url, log=lambda _: None).wait_healthy(300)
    except Exception:
        target.stop()
        raise
    return target


def serve_only(target, why: str) -> None:
    """A behaviour of `mgrpo serve` that SGLang's own server does not share (`why`)."""
    if target.kind != "serve":
        pytest.skip(f"mgrpo serve only: {why}")
