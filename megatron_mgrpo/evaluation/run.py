"""Benchmark runs outside training: an HF model directory straight into the rollout engine.

`mgrpo eval CONFIG --model HF_DIR` lands here (a checkpoint goes through the trainer, which owns
the Megatron model: `trainer.evaluate_checkpoint`). No Megatron model is built, so any model the
rollout engine serves can be scored, e.g. a base model or one converted back from a run.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict

from megatron_mgrpo.evaluation.harness import (format_table, load_configured, run_benchmarks,
                                               save_results)

__all__ = ["output_dir", "report", "evaluate_model_dir"]


def output_dir(cfg) -> str:
    """Where a config's results go: eval.output_dir, else `<training.run_dir>/eval`."""
    return cfg.eval.output_dir or os.path.join(cfg.training.run_dir, "eval")


def report(doc: Dict[str, Any], path: str, log: Callable[[str], None] = print) -> None:
    """Save the results document at `path` and print its table."""
    save_results(doc, path)
    title = doc["model"] + (f" (step {doc['step']})" if doc.get("step") is not None else "")
    log(f"eval: {title}, T={doc['sampling']['temperature']}, "
        f"max_new_tokens={doc['sampling']['max_new_tokens']}")
    for line in format_table(doc).splitlines():
        log(line)
    log(f"eval: results in {path}")


def evaluate_model_dir(cfg, model_dir: str, log: Callable[[str], None] = print
                       ) -> Dict[str, Any]:
    """Score the HF model in `model_dir` on `cfg.eval.benchmarks` through `cfg.rollout.backend`
    (the embedded engine, or SGLang servers: launched ones start from `model_dir`, attached ones
    must already serve it). Saves `<output_dir>/<model dir name>.json` and returns it."""
    from megatron_mgrpo.data.tokenizer import load_tokenizer
    from megatron_mgrpo.models.architecture import read_hf_config

    if not cfg.eval.benchmarks:
        from megatron_mgrpo.config import ConfigError

        raise ConfigError("eval.benchmarks: got []; accepted: benchmarks to run (e.g. "
                          "--benchmarks math500,aime24)")
    hf = read_hf_config(model_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer or model_dir)
    benches = load_configured(cfg.eval, log)
    engine = _engine(cfg, model_dir, hf, log)
    try:
        doc = run_benchmarks(engine, tokenizer, benches, cfg.eval,
                             int(hf.get("max_position_embeddings", 2048)), label=model_dir,
                             log=log)
    finally:
        engine.close()
    name = os.path.basename(os.path.normpath(model_dir)) or "model"
    report(doc, os.path.join(output_dir(cfg), f"{name}.json"), log)
    return doc


def _engine(cfg, model_dir: str, hf: dict, log):
    if cfg.rollout.backend == "sglang":
        from megatron_mgrpo.rollout.sglang_engine import make_sglang_engine

        if not cfg.sglang.launch:
            log(f"eval: attached SGLang servers are assumed to serve {model_dir}")
        return make_sglang_engine(cfg.sglang, model_dir, cfg.rollout.weight_bucket_mb * 2 ** 20,
                                  cfg.training.run_dir, hf, log=log)
    from megatron_mgrpo.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine.from_pretrained(model_dir, sets=("policy",))
