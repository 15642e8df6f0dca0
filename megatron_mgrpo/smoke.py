"""`mgrpo smoke`: M-GRPO update steps of the Megatron policy on a fixed synthetic rollout batch.

It runs every part of a training step except sampling: vote over policy + momentum answers,
rewards, the policy's entropies, the IQR filter, group advantages, the clipped objective through
megatron-core's forward/backward (TP/PP/DP as configured), the optimizer step and the EMA of the
weights. The rollouts are a fixed batch of random completions whose last token is the answer,
so the run is fast and deterministic; a working update shows as a falling loss and a rising
log-probability of the completions that agree with the vote. Use it to check a config's layout
before launching; the full loop with real sampling is `mgrpo train`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Dict, List

import torch

from megatron_mgrpo.algorithm.vote import exact_match
from megatron_mgrpo.config.schema import Config
from megatron_mgrpo.models.policy import MegatronPolicy
from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
from megatron_mgrpo.parallel import init_parallel
from megatron_mgrpo.update import (make_loss_fn, mode_plan, plan_update, score_groups,
                                   trained_columns)


def synthetic_rollouts(num_prompts: int, group: int, prompt_len: int, completion_len: int,
                       vocab: int, seed: int) -> Dict:
    """P prompts x G completions of random tokens; each completion's last token is its answer.

    Answers come from a 4-token answer set, one answer per prompt more likely than the others
    (p = 0.55), so most prompts have a clear majority and some groups disagree. Completion
    lengths vary, and the tail is padding.
    """
    g = torch.Generator().manual_seed(seed)
    rows = num_prompts * group
    seq = prompt_len + completion_len
    ids = torch.randint(4, vocab, (rows, seq), generator=g)
    completion_mask = torch.zeros(rows, seq)
    answer_set = torch.arange(vocab - 4, vocab)
    answers: List[List[str]] = []
    for p in range(num_prompts):
        favourite = int(answer_set[p % 4])
        group_answers = []
        for j in range(group):
            r = p * group + j
            length = int(torch.randint(completion_len // 2, completion_len + 1, (1,), generator=g))
            end = prompt_len + length
            favoured = torch.rand(1, generator=g).item() < 0.55
            ans = favourite if favoured else int(answer_set[torch.randint(0, 4, (1,),
                                                                           generator=g)])
            ids[r, end - 1] = ans
            ids[r, end:] = 0  # padding
            completion_mask[r, prompt_len:end] = 1
            group_answers.append(str(ans))
        answers.append(group_answers)
    return {"input_ids": ids, "completion_mask": completion_mask, "answers": answers}


def run_smoke(cfg: Config, log=print) -> List[Dict[str, float]]:
    """Train on the fixed batch for cfg.training.steps; return (and write) per-step metrics."""
    ctx = init_parallel(cfg.parallel, seed=cfg.training.seed)
    torch.manual_seed(cfg.training.seed)
    r, a = cfg.rollout, cfg.algorithm
    plan = mode_plan(r, a)
    policy = MegatronPolicy(cfg, ctx, total_steps=cfg.training.steps,
                            temperature=r.temperature)
    batch = synthetic_rollouts(cfg.data.prompts_per_step, plan.group_size,
                               prompt_len=8, completion_len=min(r.max_new_tokens, 16),
                               vocab=cfg.model.vocab_size, seed=cfg.training.seed)
    true_labels = [str(cfg.model.vocab_size - 4 + p % 4) for p in range(len(batch["answers"]))]
    scored = score_groups(batch["answers"], plan, exact_match, a.min_agreement, true_labels)
    trained = trained_columns(plan, len(batch["answers"]),
                              torch.Generator().manual_seed(cfg.training.seed))
    loss_fn = make_loss_fn(a)
    momentum = (ShardedMomentum(policy, MomentumSchedule.from_config(a))
                if plan.use_momentum_model else None)
    agree = (scored.rewards.reshape(-1) > 0)

    os.makedirs(cfg.training.run_dir, exist_ok=True)
    out = open(os.path.join(cfg.training.run_dir, "metrics.jsonl"), "w") if ctx.rank == 0 else None
    history = []
    old_logprobs = None
    for step in range(1, cfg.training.steps + 1):
        t0 = time.time()
        logprobs, entropy = policy.logprobs_global({"input_ids": batch["input_ids"]})
        if old_logprobs is None:  # the batch was "sampled" by the step-0 policy
            old_logprobs = logprobs
        update = plan_update(scored, plan, a, entropy, batch["completion_mask"], trained)
        train_batch = {"input_ids": batch["input_ids"], "loss_mask": update.loss_mask,
                       "advantages": update.advantages, "old_logprobs": old_logprobs}
        with (momentum.fused_into_next_step(step) if momentum is not None
              else contextlib.nullcontext()):
            result = policy.train_step(policy.dp_shard(train_batch), loss_fn,
                                       with_entropy=a.entropy_coef > 0)
        mask = batch["completion_mask"]
        traj_lp = (logprobs * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        metrics = {
            "step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
            **update.metrics, **result.metrics,
            "logp_agree": float(traj_lp[agree].mean()) if agree.any() else 0.0,
            "logp_disagree": float(traj_lp[~agree].mean()) if (~agree).any() else 0.0,
            "momentum_gap": momentum.max_gap() if momentum is not None else 0.0,
            "step_time_s": time.time() - t0,
        }
        history.append(metrics)
        if out is not None:
            out.write(json.dumps(metrics) + "\n")
            out.flush()
            if step % cfg.logging.log_interval == 0 or step == cfg.training.steps:
                log(f"step {step:4d}/{cfg.training.steps}  loss {metrics['loss']:+.4f}  "
                    f"reward {metrics['reward_mean']:.3f}  agree {metrics['vote_agreement']:.3f}  "
                    f"H {metrics['entropy_mean']:.3f}  iqr_drop {metrics['iqr_dropped_frac']:.3f}  "
                    f"logp(agree) {metrics['logp_agree']:+.3f}  "
                    f"logp(disagree) {metrics['logp_disagree']:+.3f}  "
                    f"{metrics['step_time_s']:.2f}s")
    if out is not None:
        out.close()
    return history
