"""From one step's rollouts to the policy update: vote -> rewards -> IQR filter -> advantages.

The pure algorithm lives in `megatron_mgrpo.algorithm`; this module wires it to a batch of
rollouts and to the policy's loss, in the order the method gives:

1. pseudo-label per prompt by majority vote over all G = M + N answers (or the true label, rlvr);
2. binary reward per completion;
3. trajectory entropy from the policy's forward, IQR fence over the trained trajectories;
4. GRPO advantages within each prompt's group;
5. a loss mask that keeps only the trained, unfiltered completions' tokens.

Choices the paper leaves open, as implemented (both configurable):
- the momentum model's N completions vote but get no gradient unless
  `algorithm.train_on_momentum_rollouts` (then their behaviour log-probs are the old log-probs,
  so the PPO ratio is an importance weight);
- group statistics use the kept trajectories only (`filter_before_normalization`), so a filtered
  outlier does not move its group's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_mgrpo.algorithm import (ModePlan, clipped_surrogate_loss, entropy_quartiles,
                                      group_advantages, group_binary_rewards, iqr_entropy_filter,
                                      plan_for_mode, pseudo_labels, select_training_subset,
                                      trajectory_entropy, vote_diagnostics)
from megatron_mgrpo.config.schema import AlgorithmConfig, RolloutConfig

Equivalent = Callable[[str, str], bool]


def mode_plan(rollout: RolloutConfig, alg: AlgorithmConfig) -> ModePlan:
    """What a step does under this config (ValueError when the mode's rules are broken)."""
    return plan_for_mode(alg.mode, rollout.num_policy_rollouts, rollout.num_momentum_rollouts,
                         alg.iqr_filter, alg.ttrl_num_train, alg.train_on_momentum_rollouts)


@dataclass
class Scored:
    """A step's labels and rewards, per prompt group."""

    rewards: torch.Tensor
    """float [P, G]."""
    labels: List[Optional[str]]
    """Pseudo-label (or true label in rlvr) per prompt; None: no learning signal."""
    has_signal: torch.Tensor
    """bool [P]."""
    metrics: Dict[str, float] = field(default_factory=dict)


def score_groups(answers: Sequence[Sequence[Optional[str]]], plan: ModePlan,
                 equivalent: Equivalent, min_agreement: float = 0.0,
                 true_labels: Optional[Sequence[Optional[str]]] = None) -> Scored:
    """Vote (or take the true labels), then reward every completion against its prompt's label.

    `true_labels`, when given, are used for the reward only in rlvr; otherwise they only
    measure how often the pseudo-label is right (`pseudo_label_acc`). The vote's collapse
    diagnostics (`algorithm.diagnostics.vote_diagnostics`) come with the metrics.
    """
    votes = pseudo_labels(answers, equivalent, min_agreement)
    metrics = {"vote_agreement": sum(v.agreement for v in votes) / max(len(votes), 1),
               **vote_diagnostics(votes, answers, plan.num_policy, equivalent)}
    if plan.use_vote:
        labels = [v.pseudo_label for v in votes]
    else:
        if true_labels is None:
            raise ValueError("mode rlvr needs the true labels (data.answer_key)")
        labels = list(true_labels)
    has_signal = torch.tensor([y is not None for y in labels], dtype=torch.bool)
    if true_labels is not None:
        hits = [v.majority_answer is not None and t is not None
                and bool(equivalent(t, v.majority_answer)) for v, t in zip(votes, true_labels)]
        metrics["pseudo_label_acc"] = sum(hits) / max(len(hits), 1)
    rewards = group_binary_rewards(answers, labels, equivalent)
    metrics["reward_mean"] = float(rewards.mean()) if rewards.numel() else 0.0
    metrics["signal_frac"] = float(has_signal.float().mean()) if len(labels) else 0.0
    return Scored(rewards=rewards, labels=labels, has_signal=has_signal, metrics=metrics)


def trained_columns(plan: ModePlan, num_prompts: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """bool [P, G]: which completions can receive gradient. Columns [0, M) are the policy's
    (a random num_train of them per prompt in ttrl), [M, G) the momentum model's."""
    m, g = plan.num_policy, plan.group_size
    trained = torch.zeros(num_prompts, g, dtype=torch.bool)
    for p in range(num_prompts):
        cols = (select_training_subset(m, plan.num_train, generator) if plan.train_subset
                else torch.arange(m))
        trained[p, cols] = True
    if plan.train_on_momentum_rollouts:
        trained[:, m:] = True
    return trained


@dataclass
class UpdatePlan:
    """What the optimizer steps of this rollout batch train on (rows are the flattened P x G)."""

    advantages: torch.Tensor
    """float [P * G]."""
    loss_mask: torch.Tensor
    """float [P * G, S]: completion tokens of trained, kept trajectories."""
    keep: torch.Tensor
    """bool [P * G]."""
    valid: torch.Tensor
    """bool [P * G]: trained trajectories with at least one token (the filter's population)."""
    metrics: Dict[str, float]


def plan_update(scored: Scored, plan: ModePlan, alg: AlgorithmConfig,
                token_entropy: Optional[torch.Tensor], completion_mask: torch.Tensor,
                trained: torch.Tensor) -> UpdatePlan:
    """IQR-filter the trained trajectories by entropy and compute their advantages.

    token_entropy, completion_mask: [P * G, S] (rows grouped by prompt, G per prompt).
    Without the IQR filter `token_entropy` may be None (nothing here depends on it then): the
    caller adds `entropy_summary` once it has the entropies.
    """
    p, g = scored.rewards.shape
    valid = trained.reshape(-1) & (completion_mask.sum(-1) > 0)
    metrics = dict(scored.metrics)
    if plan.use_iqr_filter:
        if token_entropy is None:
            raise ValueError("the IQR filter needs the policy's token entropies")
        h = trajectory_entropy(token_entropy, completion_mask)
        f = iqr_entropy_filter(h, alg.iqr_k, valid=valid, entropy_floor=alg.entropy_floor)
        keep = f.keep
        metrics.update(entropy_q1=f.q1, entropy_q3=f.q3, entropy_fence=f.fence,
                       iqr_dropped_frac=f.num_dropped_by_iqr / max(f.num_valid, 1),
                       floor_dropped_frac=f.num_dropped_by_floor / max(f.num_valid, 1))
    else:
        keep = valid
        metrics.update(iqr_dropped_frac=0.0)
    if token_entropy is not None:
        # The filter reported its own Q1 and Q3 above.
        metrics.update(entropy_summary(token_entropy, completion_mask, valid,
                                       quartiles=not plan.use_iqr_filter))
    adv = group_advantages(scored.rewards, keep.reshape(p, g), eps=alg.advantage_eps,
                           filter_before_normalization=alg.filter_before_normalization)
    loss_mask = completion_mask.float() * keep.float()[:, None]
    metrics["trained_frac"] = float(keep.float().mean())
    return UpdatePlan(advantages=adv.reshape(-1), loss_mask=loss_mask, keep=keep, valid=valid,
                      metrics=metrics)


def entropy_summary(token_entropy: torch.Tensor, completion_mask: torch.Tensor,
                    valid: torch.Tensor, quartiles: bool = True) -> Dict[str, float]:
    """Median (and Q1, Q3: the filter's quantile rule) and mean of the valid trajectories'
    entropies."""
    h = trajectory_entropy(token_entropy, completion_mask)
    metrics = {}
    if int(valid.sum()):
        q1, median, q3 = entropy_quartiles(h, valid)
        metrics["entropy_median"] = median
        if quartiles:
            metrics.update(entropy_q1=q1, entropy_q3=q3)
    metrics["entropy_mean"] = float(h[valid].mean()) if int(valid.sum()) else 0.0
    return metrics


def make_loss_fn(alg: AlgorithmConfig):
    """The policy's per-microbatch loss: clipped surrogate summed over tokens (megatron divides
    by the global token count), with metric sums the policy turns into global token means.

    The microbatch carries `loss_mask`, `advantages`, `old_logprobs`, with kl_coef > 0
    `ref_logprobs` and, with `tis_cap`, `behaviour_logprobs` (then `old_logprobs` are the
    proximal policy's). Without `old_logprobs` the update is exactly on-policy: the old
    log-probs are this forward's own, detached (the ratio is 1, its gradient the policy
    gradient). The importance weights' mean, max and truncated share are not among
    the metric sums: they are fixed for the whole step, so `step.rl_step` logs them exactly,
    once, over the full batch (a max does not survive the policy's sum reduction).
    """
    tis_cap = alg.tis_cap

    def loss_fn(logprobs, entropy, micro):
        mask = micro["loss_mask"]
        old = micro.get("old_logprobs")
        loss_sum, stats = clipped_surrogate_loss(
            logprobs, logprobs.detach() if old is None else old, micro["advantages"], mask,
            clip_low=alg.clip_low, clip_high=alg.clip_high,
            ref_logprobs=micro.get("ref_logprobs"), kl_coef=alg.kl_coef,
            entropy=entropy, entropy_coef=alg.entropy_coef, num_tokens=1.0,
            behaviour_logprobs=None if tis_cap is None else micro["behaviour_logprobs"],
            tis_cap=tis_cap)
        n = stats.num_tokens.float()
        metrics = {"pg_loss": stats.pg_loss * n, "clip_frac": stats.clip_frac * n,
                   "approx_kl": stats.approx_kl * n, "ratio_mean": stats.ratio_mean * n}
        if alg.kl_coef:
            metrics["kl"] = stats.kl * n
        return loss_sum, stats.num_tokens, metrics

    return loss_fn
