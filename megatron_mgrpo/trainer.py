"""`mgrpo train`: the M-GRPO loop. Each step is `step.rl_step` (sample from the policy and the
momentum model, vote, reward, filter, update, push); around it sit the prompt sampler, the
evaluations, checkpoints and metrics, each with its own schedule. The session owns the models,
the engine and the parallel context; this driver owns the run directory."""

from __future__ import annotations

import os
import time
from typing import Dict, List

from megatron_mgrpo.checkpoint import SaveSchedule, latest_step, step_dir
from megatron_mgrpo.config.schema import Config
from megatron_mgrpo.evaluation.periodic import BenchmarkEval, Validator
from megatron_mgrpo.metrics import MetricsLogger, plot_metrics
from megatron_mgrpo.session import Session
from megatron_mgrpo.step import EngineSource, rl_step


def train(cfg: Config) -> List[Dict[str, float]]:
    with Session(cfg, "train") as session:
        return run_training(session)


def run_training(session: Session) -> List[Dict[str, float]]:
    """Train `session`'s policy for training.steps; returns every logged row."""
    from megatron_mgrpo.config import dump_config
    from megatron_mgrpo.data.prompts import PromptSampler, load_prompts

    cfg, t, d = session.cfg, session.cfg.training, session.cfg.data
    prompts = load_prompts(d.train_path, d.prompt_key, d.answer_key, session.tokenizer,
                           d.max_prompt_length, log=session.say)
    sampler = PromptSampler(prompts, d.prompts_per_step, seed=t.seed, shuffle=d.shuffle)
    validator = Validator(session, t.eval_interval)
    benchmarks = BenchmarkEval(session, cfg.eval.interval)
    saves = SaveSchedule(t.save_interval, t.steps)
    start, last = 0, latest_step(t.run_dir) if t.resume else None
    if last is not None:
        state = session.load(step_dir(t.run_dir, last))
        sampler.load_state_dict(state["data"])
        start = int(state["step"])
    log = MetricsLogger(t.run_dir, t.steps, start_step=start, enabled=session.is_main,
                        tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar)
    session.log_to(log.write)
    if start:
        session.say(f"resumed from step {start}")
    if session.is_main:  # the resolved config beside the metrics: the run is reproducible
        with open(os.path.join(t.run_dir, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    session.push(start, momentum_too=True)
    history = []
    if start == 0 and (validator.enabled or benchmarks.enabled):
        base = {"step": 0, **(validator.run() if validator.enabled else {}),
                **(benchmarks.run(0) if benchmarks.enabled else {})}
        session.say(f"step 0 (base): {_fmt(base)}")
        history.append(base)
        log.log(base, advance=False)
    source = EngineSource(session)
    for step in range(start + 1, t.steps + 1):
        t0 = time.time()
        metrics = rl_step(session, source, sampler.next_batch(), step).metrics
        if validator.due(step, t.steps):
            metrics.update(validator.run())
        if benchmarks.due(step, t.steps):
            metrics.update(benchmarks.run(step))
        metrics["step_time_s"] = time.time() - t0
        history.append(metrics)
        log.log(metrics)
        if step % cfg.logging.log_interval == 0:
            session.say(f"step {step}: {_fmt(metrics)}")
        saved = saves.due(step)
        if saved:
            session.save(step, {"data": sampler.state_dict()})
        if _stop_requested(session):  # e.g. slurm's time-limit signal: save, exit, requeue
            if not saved:
                session.save(step, {"data": sampler.state_dict()})
            session.say(f"stop requested ({t.stop_file}): saved step {step}, stopping")
            break
    if session.is_main:
        plot_metrics(t.run_dir)
    log.close()
    session.log_to(print)
    return history


def _stop_requested(session: Session) -> bool:
    """Whether training.stop_file exists (rank 0 looks; every rank gets the answer)."""
    stop_file = session.cfg.training.stop_file
    return bool(stop_file) and session.broadcast(session.is_main and os.path.exists(stop_file))


_SHOWN = ("reward_mean", "vote_agreement", "pseudo_label_acc", "entropy_mean",
          "iqr_dropped_frac", "kl", "loss", "val_accuracy", "val_maj")


def _fmt(m: Dict[str, float]) -> str:
    return "  ".join(f"{k} {m[k]:.3f}" for k in _SHOWN if isinstance(m.get(k), float))
