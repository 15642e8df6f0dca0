"""`mgrpo train`: the M-GRPO loop. Each step is `step.rl_step` (sample from the policy and the
momentum model, vote, reward, filter, update, push); around it sit the prompt sampler, the
evaluations, checkpoints and metrics, each with its own schedule. The session owns the models,
the engine and the parallel context; this driver owns the run directory: one run in it at a
time (`run_dir.claim_run_dir`), stopped on request after a saved step (`stopping`), resumed
from the newest checkpoint that loads."""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional

from megatron_mgrpo.checkpoint import (CheckpointError, SaveSchedule, latest_step,
                                       remove_partial_saves, resume_candidates, step_dir,
                                       verify_checkpoint)
from megatron_mgrpo.collapse import CollapseWatch
from megatron_mgrpo.config.schema import Config
from megatron_mgrpo.evaluation.periodic import BenchmarkEval, Validator
from megatron_mgrpo.metrics import MetricsLogger, plot_metrics
from megatron_mgrpo.models.policy import NonFiniteUpdate
from megatron_mgrpo.run_dir import claim_run_dir
from megatron_mgrpo.session import Session
from megatron_mgrpo.engine_source import EngineSource
from megatron_mgrpo.step import rl_step
from megatron_mgrpo.errors import RunStopped
from megatron_mgrpo.stopping import StopRequests, exit_code


def train(cfg: Config) -> List[Dict[str, float]]:
    t = cfg.training
    with StopRequests(t.stop_file) as stops:
        lock = claim_run_dir(t.run_dir, t.resume, t.overwrite, int(os.environ.get("RANK", 0)))
        try:
            with Session(cfg, "train") as session:
                return run_training(session, stops)
        finally:
            if lock is not None:
                lock.release()


def run_training(session: Session, stops: Optional[StopRequests] = None
                 ) -> List[Dict[str, float]]:
    """Train `session`'s policy for training.steps; returns every logged row."""
    from megatron_mgrpo.config import dump_config
    from megatron_mgrpo.data.prompts import PromptSampler, load_prompts

    cfg, t, d = session.cfg, session.cfg.training, session.cfg.data
    stops = stops or StopRequests(t.stop_file)
    prompts = load_prompts(d.train_path, d.prompt_key, d.answer_key, session.tokenizer,
                           d.max_prompt_length, log=session.say,
                           chat_template=d.chat_template)
    sampler = PromptSampler(prompts, d.prompts_per_step, seed=t.seed, shuffle=d.shuffle)
    validator = Validator(session, t.eval_interval)
    benchmarks = BenchmarkEval(session, cfg.eval.interval)
    saves = SaveSchedule(t.save_interval, t.steps)
    watch = CollapseWatch(cfg.diagnostics)
    start = _resume(session, sampler, watch) if t.resume else 0
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
        _watch(session, watch, base)
        session.say(f"step 0 (base): {_fmt(base)}")
        history.append(base)
        log.log(base, advance=False)
    source = EngineSource(session)
    overlap = cfg.rollout.overlap != "none"  # the next step's prompts are generated ahead
    stops.phase, stops.saved_step = "stepping", latest_step(t.run_dir)
    for step in range(start + 1, t.steps + 1):
        t0 = time.time()
        before = sampler.state_dict(), session.policy.scheduler.num_steps
        try:
            prompts = sampler.next_batch()
            ahead = sampler.peek_batch() if overlap and step < t.steps else None
            metrics = rl_step(session, source, prompts, step, next_prompts=ahead).metrics
        except NonFiniteUpdate as e:
            raise RunStopped(f"step {step}: {e}: stopped (training.on_nonfinite stop), nothing "
                             f"from this step was saved; {_newest(t.run_dir)}", 1) from None
        except Exception as e:
            if not _is_rollout_failure(e):
                raise
            raise RunStopped(f"step {step}: the rollout failed: {e}; "
                             f"{_save_after_failure(session, step, before, sampler, watch, saves)}",
                             1) from None
        if metrics.get("nonfinite_skipped"):
            session.say(f"step {step}: loss {metrics['loss']:.4g}, grad norm "
                        f"{metrics['grad_norm']:.4g}: update skipped "
                        "(training.on_nonfinite skip)")
        if validator.due(step, t.steps):
            metrics.update(validator.run())
        if benchmarks.due(step, t.steps):
            metrics.update(benchmarks.run(step))
        _watch(session, watch, metrics)
        metrics["step_time_s"] = time.time() - t0
        history.append(metrics)
        log.log(metrics)
        if step % cfg.logging.log_interval == 0:
            session.say(f"step {step}: {_fmt(metrics)}")
        saved = saves.due(step)
        if saved:
            stops.saved_step = _save(session, step, sampler, watch)
        # rank 0's view (a signal, or slurm's stop file): every rank stops after this step
        reason = session.broadcast(stops.reason() if session.is_main else None)
        if reason:
            if not saved:
                stops.saved_step = _save(session, step, sampler, watch)
            session.say(f"stopped ({reason}) after step {step}, saved as "
                        f"{step_dir(t.run_dir, step)}; continue with the same command and "
                        "--resume")
            break
    stops.phase = "finishing"
    if session.is_main:
        plot_metrics(t.run_dir)
    log.close()
    session.log_to(print)
    if stops.signum is not None:
        raise RunStopped(f"stopped by {signal.Signals(stops.signum).name}",
                         exit_code(stops.signum))
    return history


def _watch(session: Session, watch: CollapseWatch, metrics: Dict[str, float]) -> None:
    """The row's alarms and collapse step into it; their lines to the log."""
    added, lines = watch.observe(metrics)
    metrics.update(added)
    for line in lines:
        session.say(line)


def _save(session: Session, step: int, sampler, watch: CollapseWatch) -> int:
    session.save(step, {"data": sampler.state_dict(), "diagnostics": watch.state_dict()})
    return step


def _resume(session: Session, sampler, watch: CollapseWatch) -> int:
    """Load the newest checkpoint in run_dir that loads, saying which were skipped and why;
    returns its step (0 with nothing saved)."""
    run_dir = session.cfg.training.run_dir
    if session.is_main:
        remove_partial_saves(run_dir)
    candidates = session.broadcast(resume_candidates(run_dir) if session.is_main else None)
    if not candidates:
        session.say(f"--resume: nothing is saved in {run_dir} yet: starting at step 0")
        return 0
    for step in candidates:
        path = step_dir(run_dir, step)
        problem = session.broadcast(verify_checkpoint(path) if session.is_main else None)
        if problem is None:
            try:
                state = session.load(path)
            except Exception as e:  # noqa: BLE001 (a damaged file: try the next checkpoint)
                problem = f"loading it failed ({type(e).__name__}: {str(e).splitlines()[0]})"
        if problem is None:
            sampler.load_state_dict(state["data"])
            watch.load_state_dict(state.get("diagnostics"))
            session.say(f"resumed from step {step} ({path})")
            return int(state["step"])
        session.say(f"--resume: skipping the checkpoint of step {step}: {problem}")
    raise CheckpointError(f"--resume: none of the {len(candidates)} checkpoints in "
                          f"{run_dir}/checkpoints loads (see the lines above)")


def _newest(run_dir: str) -> str:
    step = latest_step(run_dir)
    return (f"the newest checkpoint is step {step} (--resume continues from it)"
            if step is not None else "no checkpoint was saved")


def _is_rollout_failure(e: Exception) -> bool:
    from megatron_mgrpo.rollout.base import RolloutError, WeightUpdateError

    return isinstance(e, (RolloutError, WeightUpdateError))


def _save_after_failure(session: Session, step: int, before, sampler, watch, saves) -> str:
    """After a step failed in the rollout engine: save the last consistent state, unless it
    is saved already. Before the update, that is the end of the previous step (the data
    position as it was then); after it (the push failed), this step's end."""
    sampler_state, updates = before
    updated = session.policy.scheduler.num_steps != updates
    done = step if updated else step - 1
    if done < 1 or saves.due(done) and not updated:
        return _newest(session.cfg.training.run_dir)
    if not updated:
        sampler.load_state_dict(sampler_state)
    try:
        _save(session, done, sampler, watch)
    except CheckpointError as e:
        return f"saving step {done} failed too: {e}"
    return f"saved step {done} (--resume continues from it)"


_SHOWN = ("reward_mean", "vote_agreement", "pseudo_label_acc", "entropy_mean",
          "iqr_dropped_frac", "kl", "loss", "val_accuracy", "val_maj", "rollout_time_s",
          "train_time_s")


def _fmt(m: Dict[str, float]) -> str:
    return "  ".join(f"{k} {m[k]:.3f}" for k in _SHOWN if isinstance(m.get(k), float))
