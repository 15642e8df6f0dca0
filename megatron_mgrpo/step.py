"""One RL step, the only place where the algorithm meets Megatron. In the method's order:

  1. sample M completions per prompt from the policy and N from the momentum model;
  2. vote over all M + N answers -> pseudo-labels -> binary rewards (true labels in rlvr);
  3. the policy's log-probs and token entropies of every completion (one forward; skipped
     where the update is exactly on-policy: the training forward gives them, `reuses_forward`);
  4. behaviour log-probs for the momentum model's rows (the engine's: it sampled them); with
     `algorithm.tis_cap`, the policy's own for every row, the engine's through a truncated
     importance weight instead;
  5. the reference model's log-probs (with a KL term);
  6. IQR entropy filter -> GRPO group advantages -> loss mask;
  7. PPO epochs x minibatches of clipped-surrogate steps, the EMA fused into the last one;
  8. push the new policy (and, every K steps, the momentum model) into the rollout engine.

Training samples from the session's engine (`engine_source.EngineSource`, which may generate
the next step's completions while this one trains); `mgrpo smoke` runs the same step over a
fixed synthetic batch (`smoke.SyntheticSource`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Protocol, Sequence

import torch

from megatron_mgrpo.algorithm import truncated_importance_weights
from megatron_mgrpo.models.policy import NonFiniteUpdate
from megatron_mgrpo.timing import PhaseTimer
from megatron_mgrpo.update import (Scored, entropy_summary, make_loss_fn, plan_update,
                                   score_groups, trained_columns)


@dataclasses.dataclass
class RolloutBatch:
    """A step's completions as one padded batch; rows are prompt-major (P groups of G)."""

    input_ids: torch.Tensor
    """[P * G, S] prompt + completion, right-padded."""
    completion_mask: torch.Tensor
    """[P * G, S] 1 on completion tokens."""
    behaviour_logprobs: torch.Tensor
    """[P * G, S] the sampling engine's log-probs of the completion tokens (0 elsewhere)."""
    answers: List[List[Optional[str]]]
    """[P][G] extracted answers (None: unparseable)."""
    completion_lengths: torch.Tensor
    """[P * G] generated tokens per completion."""
    truncated: Optional[torch.Tensor] = None
    """[P * G] bool: the completion ran out of tokens (finish_reason "length")."""


def build_batch(prompt_ids: Sequence[Sequence[int]], groups, extract, decode, pad_id: int,
                grade_truncated: bool = True) -> RolloutBatch:
    """Pack prompts and their completions ([P][G] engine Completions) into tensors; without
    `grade_truncated`, a completion that ran out of tokens has no answer."""
    rows, masks, lps, answers, lengths, cuts = [], [], [], [], [], []
    for prompt, completions in zip(prompt_ids, groups):
        group_answers = []
        for c in completions:
            rows.append(list(prompt) + list(c.token_ids))
            masks.append([0] * len(prompt) + [1] * len(c.token_ids))
            lps.append([0.0] * len(prompt) + list(c.logprobs))
            lengths.append(len(c.token_ids))
            cuts.append(c.finish_reason == "length")
            ungraded = cuts[-1] and not grade_truncated
            group_answers.append(None if ungraded else extract(decode(list(c.token_ids))))
        answers.append(group_answers)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    blp = torch.zeros(len(rows), width)
    for i, (r, m, lp) in enumerate(zip(rows, masks, lps)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
        blp[i, :len(lp)] = torch.tensor(lp)
    return RolloutBatch(ids, mask, blp, answers, torch.tensor(lengths, dtype=torch.float),
                        torch.tensor(cuts, dtype=torch.bool))


class RolloutSource(Protocol):
    def sample(self, prompt_ids: List[List[int]], step: int) -> RolloutBatch:
        """M policy + N momentum completions per prompt, the same batch on every rank."""


def sampling(cfg, tokenizer, seed: int, max_new_tokens: Optional[int] = None):
    """The rollout section's sampling parameters, stopping at the tokenizer's stop tokens."""
    from megatron_mgrpo.rollout.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p,
                          max_new_tokens=max_new_tokens or r.max_new_tokens,
                          stop_token_ids=list(tokenizer.stop_ids), seed=seed)


@dataclasses.dataclass
class StepRecord:
    """What a step did: its metrics, and what drivers may want to look at further."""

    metrics: Dict[str, float]
    batch: RolloutBatch
    scored: Scored
    logprobs: Optional[torch.Tensor]
    """[P * G, S] the policy's log-probs before the update (None: a refused update whose
    log-probs came from its own training forward)."""


def rl_step(session, source: RolloutSource, prompts: Sequence, step: int,
            next_prompts: Optional[Sequence] = None) -> StepRecord:
    """One M-GRPO step (module docstring) on `prompts` (objects with `prompt_ids`, `answer`).
    Its phases' seconds are in the metrics as `<phase>_time_s` (`timing.PhaseTimer`). With
    `next_prompts` and a source that generates ahead (`engine_source.EngineSource` under
    rollout.overlap), the next step's generation runs while this one trains."""
    cfg, mode, policy = session.cfg, session.mode, session.policy
    a = cfg.algorithm
    timer = PhaseTimer()
    with timer("rollout"):  # generation (by model, below), the broadcast, decoding, grading
        batch = source.sample([p.prompt_ids for p in prompts], step)
    ahead = getattr(source, "ahead", None) if next_prompts is not None else None
    if ahead is not None:
        ahead([p.prompt_ids for p in next_prompts], step + 1)
    with timer("score"):
        scored = score_groups(batch.answers, mode, session.grader.equivalent, a.min_agreement,
                              [p.answer for p in prompts])
    reuse = reuses_forward(a, mode)
    logprobs = entropy = None
    if not reuse:
        with timer("logprob"):
            logprobs, entropy = policy.logprobs_global({"input_ids": batch.input_ids})
    momentum_rows = _momentum_rows(batch, mode)
    behaviour = None
    if a.tis_cap is not None:
        # Decoupled PPO: the clip is around the proximal policy (the policy before this
        # update) on every row; the engine's log-probs, whoever sampled, enter only through
        # the truncated importance weight.
        behaviour = batch.behaviour_logprobs.to(dtype=torch.float32)
    with timer("reference"):
        ref = session.reference_logprobs(batch.input_ids)
    trained = trained_columns(mode, len(prompts),
                              torch.Generator().manual_seed(cfg.training.seed + step))
    update = plan_update(scored, mode, a, entropy, batch.completion_mask, trained)
    metrics = {"step": step, **update.metrics, "logprobs_reused": float(reuse)}
    with timer("train"):
        if reuse:  # the old log-probs are the training forward's own (the loss detaches them)
            train_metrics, logprobs, entropy = _ppo(session, batch.input_ids, update.advantages,
                                                    update.loss_mask, None, ref, step, behaviour)
            if entropy is not None:  # None: a refused update (`on_nonfinite: skip`)
                metrics.update(entropy_summary(entropy, batch.completion_mask, update.valid))
        else:
            old = logprobs
            if a.tis_cap is None:
                # The momentum model's completions were sampled by it: their behaviour
                # log-probs are the engine's, not the policy's.
                old = logprobs.clone()
                old[momentum_rows.to(old.device)] = \
                    batch.behaviour_logprobs[momentum_rows].to(old)
            train_metrics = _ppo(session, batch.input_ids, update.advantages, update.loss_mask,
                                 old, ref, step, behaviour)[0]
    metrics.update(train_metrics)
    if logprobs is not None:
        metrics["rollout_logprob_gap"] = _logprob_gap(batch, logprobs, ~momentum_rows)
    if behaviour is not None and logprobs is not None:
        # Prox and behaviour are fixed for the whole step, so the weights every minibatch
        # used are these: their exact global mean, max and truncated share, once.
        w = truncated_importance_weights(logprobs, behaviour.to(logprobs.device),
                                         update.loss_mask.to(logprobs.device), a.tis_cap)
        metrics.update(tis_weight_mean=float(w.mean), tis_weight_max=float(w.max),
                       tis_truncated_frac=float(w.truncated_frac))
    ahead_busy = 0.0
    if ahead is not None:
        with timer("overlap_wait"):  # no weights change under a generation
            ahead_busy = source.settle()
    with timer("push"):
        metrics.update(session.push(step, step % cfg.rollout.momentum_push_interval == 0))
    metrics["completion_len"] = float(batch.completion_lengths.mean())
    if batch.truncated is not None:
        metrics["truncated_frac"] = float(batch.truncated.float().mean())
    phases = timer.pop()
    # The trainer waits for this step's rollout and for the generation ahead to finish; the
    # engine idles for the rest of the step less what it generated ahead meanwhile.
    total = sum(phases.values())
    phases["trainer_wait_time_s"] = phases["rollout_time_s"] + phases.get("overlap_wait_time_s",
                                                                          0.0)
    phases["engine_wait_time_s"] = max(0.0, total - phases["rollout_time_s"] - ahead_busy)
    metrics.update(phases)
    source_metrics = getattr(source, "pop_metrics", None)
    if source_metrics is not None:
        metrics.update(source_metrics())
    return StepRecord(metrics, batch, scored, logprobs)


def reuses_forward(a, mode) -> bool:
    """True when the training forward itself gives the policy's log-probs before the update:
    one PPO epoch of one minibatch (the forward's weights are those before the only optimizer
    step), no IQR filter (it needs the entropies before the update), and no trained row whose
    old log-probs are the engine's (momentum rows trained on without `tis_cap`)."""
    return (not a.recompute_logprobs and a.ppo_epochs == 1 and a.ppo_minibatches == 1
            and not mode.use_iqr_filter
            and (a.tis_cap is not None or not mode.train_on_momentum_rollouts))


def _momentum_rows(batch: RolloutBatch, mode) -> torch.Tensor:
    """bool [P * G]: rows the momentum model sampled (columns [M, G) of each group)."""
    rows = torch.arange(batch.input_ids.shape[0])
    return (rows % mode.group_size) >= mode.num_policy


def _logprob_gap(batch: RolloutBatch, policy_logprobs: torch.Tensor,
                 policy_rows: torch.Tensor) -> float:
    """Mean |engine - trainer| log-prob over the policy's completion tokens: the mismatch
    between the weights that sampled and the weights that train (FP8 rollout weights,
    kernels, a stale push would all show here)."""
    mask = batch.completion_mask * policy_rows.float()[:, None]
    gap = (batch.behaviour_logprobs - policy_logprobs.float().cpu()).abs() * mask
    return float(gap.sum() / mask.sum().clamp(min=1))


def _ppo(session, input_ids, advantages, loss_mask, old_logprobs, ref_logprobs, step: int,
         behaviour_logprobs=None):
    """PPO epochs x minibatches over this step's rollouts (each rank its DP shard); the
    momentum model moves once, inside the last optimizer step. Returns the metrics and,
    without `old_logprobs` (one exactly on-policy update), the training forward's log-probs
    and entropies of the whole batch ([B, S] each, on every rank; else None, None)."""
    a, policy, momentum = session.cfg.algorithm, session.policy, session.momentum
    full = {"input_ids": input_ids, "loss_mask": loss_mask, "advantages": advantages}
    keep_values = old_logprobs is None
    if not keep_values:
        full["old_logprobs"] = old_logprobs
    if ref_logprobs is not None:
        full["ref_logprobs"] = ref_logprobs
    if behaviour_logprobs is not None:
        full["behaviour_logprobs"] = behaviour_logprobs
    rows = torch.arange(input_ids.shape[0])
    g = torch.Generator().manual_seed(session.cfg.training.seed + step)
    loss_fn = make_loss_fn(a)
    results = []
    last = a.ppo_epochs * a.ppo_minibatches
    try:
        for _ in range(a.ppo_epochs):
            order = torch.randperm(len(rows), generator=g) if a.ppo_minibatches > 1 else rows
            for part in order.chunk(a.ppo_minibatches):
                mini = {k: v[part] for k, v in full.items()}
                ema = (momentum.fused_into_next_step(step)
                       if momentum is not None and len(results) + 1 == last
                       else contextlib.nullcontext())
                with ema:
                    results.append(policy.train_step(policy.dp_shard(mini), loss_fn,
                                                     with_entropy=a.entropy_coef > 0,
                                                     keep_values=keep_values))
    except NonFiniteUpdate as e:
        # Nothing of the refused update was applied; `skip` leaves the rest of the step out
        # too (the EMA moves only with the step's last update, so it stays where it was).
        if session.cfg.training.on_nonfinite != "skip":
            raise
        return {"loss": e.loss, "grad_norm": e.grad_norm, "nonfinite_skipped": 1.0,
                "lr": policy.optimizer.param_groups[0]["lr"],
                "updates_applied": float(len(results))}, None, None
    final = results[-1]
    out = {"loss": sum(r.loss for r in results) / len(results),
           "grad_norm": max(r.grad_norm for r in results), "lr": final.lr,
           "num_tokens": float(sum(r.num_tokens for r in results))}
    for k in final.metrics:
        out[k] = sum(r.metrics[k] for r in results) / len(results)
    if not keep_values:
        return out, None, None
    lp, ent = policy.gather_dp(input_ids.shape[0], final.logprobs, final.entropy)
    return out, lp, ent
