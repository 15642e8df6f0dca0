"""What a run needs beyond a valid config, checked before anything heavy is imported or built.

`Config.validate()` checks a config on its own (`mgrpo config` and `mgrpo plan` need no more);
`check_run(cfg, purpose)` adds what `mgrpo train`, `eval` and `smoke` need of the machine: the
files the run reads, a tokenizer, the layouts training supports. It runs before torch.distributed
and megatron-core are imported, so a bad run fails in well under a second with one line naming
the field, instead of after the process groups and the model are set up. File and directory
tests only; this module imports nothing from the package outside `config/`.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_mgrpo.config.checks import ConfigError, fail

__all__ = ["check_run", "PURPOSES"]

PURPOSES = ("train", "eval", "smoke")

TOKENIZER_ACCEPTED = ("model.load (an HF model directory or converted checkpoint, whose "
                      "tokenizer is used) or data.tokenizer (an HF tokenizer directory or a "
                      "sentencepiece .model file)")


def check_run(cfg, purpose: str, checkpoint: Optional[str] = None) -> None:
    """ConfigError (one line, naming the field) for what `purpose` would fail on later:
    train: a tokenizer (model.load or data.tokenizer), data.train_path, data.val_path when
    validating; eval: something to evaluate, `checkpoint` (the --checkpoint flag) when given;
    all: parallel.context_parallel 1 (counted by `mgrpo plan`, not wired into training), a GPU
    for model.fp8, the FP8 copy's source for launched servers."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}; accepted: {' | '.join(PURPOSES)}")
    d, m = cfg.data, cfg.model
    if cfg.parallel.context_parallel != 1:
        fail("parallel.context_parallel", cfg.parallel.context_parallel,
             "1 for a run (context parallelism is counted by `mgrpo plan` but not wired into "
             "training)")
    if purpose == "eval" and not d.val_path and not cfg.eval.benchmarks:
        raise ConfigError("nothing to evaluate: set data.val_path (validation prompts) or "
                          "eval.benchmarks (e.g. --benchmarks math500,aime24)")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint: no checkpoint directory at {checkpoint!r}")
    if purpose != "smoke":
        if not (d.tokenizer or m.load):
            raise ConfigError(f"model.load and data.tokenizer: both null; mgrpo {purpose} needs "
                              f"one: {TOKENIZER_ACCEPTED}")
        if d.tokenizer and not os.path.exists(d.tokenizer):
            fail("data.tokenizer", d.tokenizer, "an HF tokenizer directory or a sentencepiece "
                 ".model file (nothing is at this path)")
    if purpose == "train":
        if not d.train_path:
            raise ConfigError("data.train_path: got None; accepted: a jsonl or parquet file of "
                              "training prompts (mgrpo train needs one)")
        _a_file("data.train_path", d.train_path)
        if cfg.training.eval_interval and d.val_path:
            _a_file("data.val_path", d.val_path)
    if purpose == "eval" and d.val_path:
        _a_file("data.val_path", d.val_path)
    if m.fp8 is not None:
        import torch  # only here: FP8 asks the machine (models.gpt checks TE and the GPU kind)

        if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
            raise ConfigError(f"model.fp8: got {m.fp8!r}; accepted here: null (FP8 needs a CUDA "
                              "GPU with FP8, Hopper or newer, and Transformer Engine; this "
                              "machine has no GPU)")
    if (purpose != "smoke" and cfg.rollout.backend == "sglang" and cfg.sglang.launch
            and cfg.rollout.weight_format == "fp8" and not (m.load and os.path.isdir(m.load))):
        fail("model.load", m.load, "an HF directory (rollout.weight_format fp8 with "
             "sglang.launch: the servers start from an FP8 copy of it)")


def _a_file(field: str, path: str) -> None:
    if os.path.isdir(path):
        fail(field, path, "a prompt file (.jsonl, .json, .parquet, .csv); this is a directory")
    if not os.path.exists(path):
        fail(field, path, "a prompt file (.jsonl, .json, .parquet, .csv); nothing is at this "
             "path")
