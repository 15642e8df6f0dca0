"""`mgrpo smoke`: the RL step (`step.rl_step`) over a fixed synthetic rollout batch.

It runs every part of a training step except sampling: vote over policy + momentum answers,
rewards, the policy's entropies, the momentum rows' behaviour log-probs, the reference model's
log-probs (with a KL term), the IQR filter, group advantages, the clipped objective through
megatron-core's forward/backward (TP/PP/DP as configured), the optimizer step and the EMA of the
weights. The rollouts are a fixed batch of random completions whose last token is the answer,
"sampled" by the step-0 policy and momentum model (the same weights), so the run is fast and
deterministic; a working update shows as a rising log-probability of the completions that agree
with the vote and a falling one of those that do not. Use it to check a config's layout before
launching; the full loop with real sampling is `mgrpo train`.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Dict, List

import torch

from megatron_mgrpo.algorithm.vote import exact_match
from megatron_mgrpo.config.schema import Config
from megatron_mgrpo.rewards import Grader
from megatron_mgrpo.session import Session
from megatron_mgrpo.step import RolloutBatch, rl_step


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


class SyntheticSource:
    """The fixed synthetic batch as a rollout source. Its behaviour log-probs are the step-0
    policy's, computed on first use: at step 0 the momentum model equals the policy."""

    def __init__(self, session: Session, batch: Dict):
        self.session, self.batch = session, batch
        self._behaviour = None

    def sample(self, prompt_ids, step: int) -> RolloutBatch:
        b = self.batch
        if self._behaviour is None:
            lp, _ = self.session.policy.logprobs_global({"input_ids": b["input_ids"]},
                                                        with_entropy=False)
            self._behaviour = lp.float().cpu() * b["completion_mask"]
        return RolloutBatch(b["input_ids"], b["completion_mask"], self._behaviour, b["answers"],
                            b["completion_mask"].sum(-1))


def run_smoke(cfg: Config, log=print) -> List[Dict[str, float]]:
    """rl_step over the fixed batch for cfg.training.steps; return (and write) the metrics."""
    with Session(cfg, "smoke") as session:
        session.log_to(log)
        # Answers are the completions' last tokens, compared as they are.
        session.grader = Grader(extract=lambda text: text, equivalent=exact_match)
        mode = session.mode
        batch = synthetic_rollouts(cfg.data.prompts_per_step, mode.group_size, prompt_len=8,
                                   completion_len=min(cfg.rollout.max_new_tokens, 16),
                                   vocab=cfg.model.vocab_size, seed=cfg.training.seed)
        prompts = [SimpleNamespace(prompt_ids=[], answer=str(cfg.model.vocab_size - 4 + p % 4))
                   for p in range(len(batch["answers"]))]
        source = SyntheticSource(session, batch)
        out = None
        if session.is_main:
            os.makedirs(cfg.training.run_dir, exist_ok=True)
            out = open(os.path.join(cfg.training.run_dir, "metrics.jsonl"), "w")
        history = []
        mask = batch["completion_mask"]
        for step in range(1, cfg.training.steps + 1):
            record = rl_step(session, source, prompts, step)
            agree = record.scored.rewards.reshape(-1) > 0
            traj_lp = (record.logprobs.float().cpu() * mask).sum(-1) / mask.sum(-1).clamp_min(1)
            metrics = {
                **record.metrics,
                "logp_agree": float(traj_lp[agree].mean()) if agree.any() else 0.0,
                "logp_disagree": float(traj_lp[~agree].mean()) if (~agree).any() else 0.0,
                "momentum_gap": (session.momentum.max_gap() if session.momentum is not None
                                 else 0.0),
            }
            history.append(metrics)
            if out is not None:
                out.write(json.dumps(metrics) + "\n")
                out.flush()
            if step % cfg.logging.log_interval == 0 or step == cfg.training.steps:
                session.say(
                    f"step {step:4d}/{cfg.training.steps}  loss {metrics['loss']:+.4f}  "
                    f"reward {metrics['reward_mean']:.3f}  agree {metrics['vote_agreement']:.3f}  "
                    f"H {metrics['entropy_mean']:.3f}  iqr_drop {metrics['iqr_dropped_frac']:.3f}  "
                    f"logp(agree) {metrics['logp_agree']:+.3f}  "
                    f"logp(disagree) {metrics['logp_disagree']:+.3f}")
        if out is not None:
            out.close()
        return history
