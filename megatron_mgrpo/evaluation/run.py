"""Evaluation outside training: `mgrpo eval`.

- `evaluate_checkpoint`: a run's checkpoint (or model.load) in a Session built for eval (the
  policy frozen, no optimizer, no momentum model, no training data), through the rollout engine.
- `evaluate_model_dir`: an HF model directory straight into the rollout engine; no Megatron
  model is built, so any model the engine serves can be scored, e.g. a base model or one
  converted back from a run.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from megatron_mgrpo.evaluation.harness import (load_configured, output_dir, report,
                                               run_benchmarks)

__all__ = ["output_dir", "report", "evaluate_checkpoint", "evaluate_model_dir"]


def evaluate_checkpoint(cfg, checkpoint: Optional[str] = None) -> Dict[str, float]:
    """Validation pass@1 / maj@k (data.val_path) and benchmark scores (eval.benchmarks) of a
    checkpoint (default: the run's newest; none there: model.load). Prints what it loads and
    the results; returns the figures (the same on every rank)."""
    from megatron_mgrpo.checkpoint import latest_step, step_dir
    from megatron_mgrpo.config import ConfigError
    from megatron_mgrpo.evaluation.periodic import BenchmarkEval, Validator
    from megatron_mgrpo.session import Session

    if not cfg.data.val_path and not cfg.eval.benchmarks:
        raise ConfigError("nothing to evaluate: set data.val_path (validation prompts) or "
                          "eval.benchmarks (e.g. --benchmarks math500,aime24)")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ConfigError(f"--checkpoint: no checkpoint directory at {checkpoint!r}")
    if checkpoint is None:
        last = latest_step(cfg.training.run_dir)
        checkpoint = step_dir(cfg.training.run_dir, last) if last is not None else None
    with Session(cfg, "eval") as session:
        validator = Validator(session, interval=1)
        benchmarks = BenchmarkEval(session, interval=1)
        step = None
        if checkpoint is not None:
            session.say(f"eval: loading {checkpoint}")
            step = int(session.load(checkpoint)["step"])
        source = checkpoint or cfg.model.load or "random init"
        session.push(step or 0, momentum_too=False)
        result = {}
        if validator.enabled:
            result = validator.run()
            session.say(f"{source}: val_accuracy (pass@1, k={cfg.training.eval_samples}) "
                        f"{result['val_accuracy']:.4f}  val_maj (maj@k) "
                        f"{result['val_maj']:.4f}")
        if benchmarks.enabled:
            result.update(benchmarks.run(step or 0))
    return result


def evaluate_model_dir(cfg, model_dir: str, log: Callable[[str], None] = print
                       ) -> Dict[str, Any]:
    """Score the HF model in `model_dir` on `cfg.eval.benchmarks` through `cfg.rollout.backend`
    (the embedded engine, or SGLang servers: launched ones start from `model_dir`, attached ones
    must already serve it). Saves `<output_dir>/<model dir name>.json` and returns it."""
    from megatron_mgrpo.data.tokenizer import load_tokenizer
    from megatron_mgrpo.models.architecture import read_hf_config
    from megatron_mgrpo.rollout.factory import make_engine

    if not cfg.eval.benchmarks:
        from megatron_mgrpo.config import ConfigError

        raise ConfigError("eval.benchmarks: got []; accepted: benchmarks to run (e.g. "
                          "--benchmarks math500,aime24)")
    hf = read_hf_config(model_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer or model_dir)
    benches = load_configured(cfg.eval, log)
    engine = make_engine(cfg, model_dir, hf, sets=("policy",), weights_from_dir=True, log=log)
    try:
        doc = run_benchmarks(engine, tokenizer, benches, cfg.eval,
                             int(hf.get("max_position_embeddings", 2048)), label=model_dir,
                             log=log)
    finally:
        engine.close()
    name = os.path.basename(os.path.normpath(model_dir)) or "model"
    report(doc, os.path.join(output_dir(cfg), f"{name}.json"), log)
    return doc
