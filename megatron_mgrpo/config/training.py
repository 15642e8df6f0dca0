"""The algorithm, optimizer, data and training sections.

Each section checks its own fields (`validate()`). The mode rules are the algorithm's: the
algorithm section checks the rollout counts against them with `algorithm.modes.plan_for_mode`,
a leaf module (nothing else from this package, and no torch at import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_mgrpo.config.checks import ConfigError, fail, one_of, positive
from megatron_mgrpo.config.rollout import RolloutConfig

__all__ = ["AlgorithmConfig", "OptimizerConfig", "DataConfig", "TrainingConfig"]


GRADER_NAMES = ("math", "final_number", "multiple_choice")
"""`rewards.GRADERS`, named here because config/ imports nothing above it (a test keeps the two,
and the field's Literal, equal)."""


@dataclass
class AlgorithmConfig:
    """The M-GRPO method and its baselines. `mode` selects which parts run."""

    mode: Literal["mgrpo", "srt", "ttrl", "rlvr"] = "mgrpo"
    """`mgrpo`: vote over policy + momentum rollouts. `srt`: vote over the policy's own (N=0).
    `ttrl`: vote over a large sample, train on a subset. `rlvr`: ground-truth labels."""

    grader: Literal["math", "final_number", "multiple_choice"] = "math"
    """How answers are extracted and compared (math: `\\boxed{}` + math-verify equivalence;
    final_number: a box, else the number after `####` or "answer is", else the last number;
    multiple_choice: the option letter)."""

    grade_truncated: bool = True
    """Whether a completion cut off at rollout.max_new_tokens has an answer. False: it has none
    (it neither votes nor matches the pseudo-label), so the vote cannot settle on whatever
    number a rambling, unfinished completion happens to end with (README, SmolLM2's runs)."""

    momentum: float = 0.99
    """m in Eq. 1: theta_k <- m * theta_k + (1 - m) * theta_q. In [0, 1)."""

    momentum_update_interval: int = 1
    """Update the EMA every this many training steps (fused into the step's last optimizer
    update; with several PPO minibatches per step the EMA still moves once)."""

    momentum_warmup_updates: int = 0
    """Over the first this many EMA updates m rises linearly from `momentum_warmup_start` to
    `momentum` (0: m is constant)."""

    momentum_warmup_start: float = 0.0
    """m of the first EMA update while warming up. In [0, 1)."""

    min_agreement: float = 0.0
    """Prompts whose majority share is below this get no learning signal. In [0, 1]."""

    iqr_filter: bool = True
    """Drop low-entropy outlier trajectories (Eq. 2)."""

    iqr_k: float = 0.75
    """k in the IQR fence Q1 - k * IQR (>= 0)."""

    entropy_floor: Optional[float] = None
    """Optional absolute entropy floor beside the relative fence (catches whole-batch collapse)."""

    filter_before_normalization: bool = True
    """Compute group advantage statistics over kept trajectories only (else over all)."""

    train_on_momentum_rollouts: bool = False
    """Whether the momentum model's N completions also get gradient (importance-weighted);
    by default they only vote."""

    ttrl_num_train: Optional[int] = None
    """TTRL: how many of the policy's M completions per prompt are trained on."""

    advantage_eps: float = 1e-6
    """eps in (r - mean) / (std + eps)."""

    clip_low: float = 0.2
    """PPO ratio clip below 1 (ratio >= 1 - clip_low)."""

    clip_high: float = 0.2
    """PPO ratio clip above 1 (ratio <= 1 + clip_high)."""

    kl_coef: float = 0.0
    """Weight of the low-variance (k3) KL to the reference model (0: no reference is built
    and no KL is computed)."""

    kl_reference: Literal["base", "momentum"] = "base"
    """What the KL anchors to when kl_coef > 0: `base` (the frozen initial weights, a third
    copy of the model in the training dtype, one extra forward per step) or `momentum` (the
    momentum model itself: no extra copy, its log-probs from a forward with the EMA weights
    swapped in)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""

    ppo_epochs: int = 1
    """Passes over each step's rollouts."""

    ppo_minibatches: int = 1
    """Optimizer steps per epoch (the rollouts split into this many minibatches)."""

    tis_cap: Optional[float] = None
    """Importance correction for completions the trained policy did not sample (the momentum
    model's when trained on, engine-vs-trainer numerics such as FP8, stale rollouts): decoupled
    PPO, the ratio clipped around the policy's log-probs recomputed before the update, times
    the truncated weight min(pi_prox / pi_behaviour, tis_cap) from the engine's log-probs.
    null (default): off, the plain PPO loss. 2.0 is verl's default. At least 1, so that a token
    sampled by the proximal policy itself keeps weight 1."""

    recompute_logprobs: bool = False
    """Run the separate forward for the policy's log-probs before the update even where the
    update is exactly on-policy (one PPO epoch of one minibatch, no IQR filter): there the
    training forward's own log-probs, taken before its only optimizer step, are the same
    numbers, and the step skips that forward (`logprobs_reused` 1 in the metrics).
    true: always run it (to compare the two paths, or to time it)."""

    def validate(self, rollout: RolloutConfig) -> None:
        """Check this section, and the rollout counts against the mode's rules; ConfigError
        naming the field."""
        from megatron_mgrpo.algorithm.modes import MODES, plan_for_mode  # no torch

        a, r = self, rollout
        one_of("algorithm.mode", a.mode, MODES)
        one_of("algorithm.grader", a.grader, GRADER_NAMES)
        # The friendlier messages first; plan_for_mode below is where the rules live.
        m, n = r.num_policy_rollouts, r.num_momentum_rollouts
        if a.mode in ("mgrpo", "srt", "ttrl") and m + n < 2:
            fail("rollout.num_policy_rollouts + rollout.num_momentum_rollouts", m + n,
                 f">= 2 (a vote needs at least two completions in mode {a.mode})")
        if a.mode == "srt" and n != 0:
            fail("rollout.num_momentum_rollouts", n, "0 in mode srt")
        if a.mode == "mgrpo" and n < 1:
            fail("rollout.num_momentum_rollouts", n, ">= 1 in mode mgrpo (use mode srt for N = 0)")
        if a.mode == "ttrl" and a.ttrl_num_train is not None and not 1 <= a.ttrl_num_train <= m:
            fail("algorithm.ttrl_num_train", a.ttrl_num_train,
                 f"an integer in [1, rollout.num_policy_rollouts={m}]")
        try:
            plan_for_mode(a.mode, m, n, a.iqr_filter, a.ttrl_num_train,
                          a.train_on_momentum_rollouts)
        except ValueError as e:
            raise ConfigError(f"algorithm.mode {a.mode!r} with rollout.num_policy_rollouts={m}, "
                              f"rollout.num_momentum_rollouts={n}: {e}") from None
        if not 0 <= a.momentum < 1:
            fail("algorithm.momentum", a.momentum, "a number in [0, 1)")
        positive("algorithm.momentum_update_interval", a.momentum_update_interval)
        if a.momentum_warmup_updates < 0:
            fail("algorithm.momentum_warmup_updates", a.momentum_warmup_updates,
                 "an integer >= 0")
        if not 0 <= a.momentum_warmup_start < 1:
            fail("algorithm.momentum_warmup_start", a.momentum_warmup_start,
                 "a number in [0, 1)")
        if not 0 <= a.min_agreement <= 1:
            fail("algorithm.min_agreement", a.min_agreement, "a number in [0, 1]")
        if a.iqr_k < 0:
            fail("algorithm.iqr_k", a.iqr_k, "a number >= 0")
        if a.entropy_floor is not None and a.entropy_floor < 0:
            fail("algorithm.entropy_floor", a.entropy_floor, "null or a number >= 0")
        if a.clip_low < 0 or a.clip_low >= 1:
            fail("algorithm.clip_low", a.clip_low, "a number in [0, 1)")
        if a.clip_high < 0:
            fail("algorithm.clip_high", a.clip_high, "a number >= 0")
        one_of("algorithm.kl_reference", a.kl_reference, ("base", "momentum"))
        if a.kl_coef > 0 and a.kl_reference == "momentum" and a.mode != "mgrpo":
            fail("algorithm.kl_reference", a.kl_reference,
                 f"base in mode {a.mode} (no momentum model is kept there)")
        for name in ("kl_coef", "entropy_coef", "advantage_eps"):
            if getattr(a, name) < 0:
                fail(f"algorithm.{name}", getattr(a, name), "a number >= 0")
        positive("algorithm.ppo_epochs", a.ppo_epochs)
        positive("algorithm.ppo_minibatches", a.ppo_minibatches)
        if a.tis_cap is not None and not a.tis_cap >= 1:
            fail("algorithm.tis_cap", a.tis_cap, "null or a number >= 1")


@dataclass
class OptimizerConfig:
    """Adam through megatron-core's optimizer."""

    lr: float = 1e-5
    """Peak learning rate."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up."""

    warmup_fraction: float = 0.0
    """Share of the training steps spent warming up linearly, in [0, 1)."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field."""
        o = self
        one_of("optimizer.schedule", o.schedule, ("constant", "cosine", "linear"))
        if not o.lr > 0:
            fail("optimizer.lr", o.lr, "a number > 0")
        if o.min_lr < 0 or o.min_lr > o.lr:
            fail("optimizer.min_lr", o.min_lr, f"a number in [0, optimizer.lr={o.lr}]")
        if not 0 <= o.warmup_fraction < 1:
            fail("optimizer.warmup_fraction", o.warmup_fraction, "a number in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(o, name) < 1:
                fail(f"optimizer.{name}", getattr(o, name), "a number in [0, 1)")
        if o.clip_grad < 0:
            fail("optimizer.clip_grad", o.clip_grad, "a number >= 0 (0 disables clipping)")


@dataclass
class DataConfig:
    """Prompt data."""

    train_path: Optional[str] = None
    """jsonl or parquet file of training prompts."""

    val_path: Optional[str] = None
    """jsonl or parquet file of validation prompts (with answers)."""

    prompt_key: str = "prompt"
    """Column holding the prompt text."""

    answer_key: Optional[str] = "answer"
    """Column holding the true answer (used for RLVR and for reporting pseudo-label accuracy
    only, never for the self-supervised reward)."""

    tokenizer: Optional[str] = None
    """Tokenizer: an HF tokenizer directory or a sentencepiece `.model` file."""

    max_prompt_length: int = 128
    """Prompts longer than this (in tokens) are skipped and counted."""

    prompts_per_step: int = 8
    """Prompts per training step."""

    shuffle: bool = True
    """Shuffle the training prompts every epoch."""

    chat_template: bool = False
    """Render each training and validation prompt as one user turn of the tokenizer's chat
    template, with the generation prompt (`apply_chat_template(..., add_generation_prompt=True)`,
    no extra BOS): for instruct models. Off: [BOS] + the raw text. Needs an HF tokenizer with a
    chat template; max_prompt_length counts the template's tokens too. Benchmarks follow
    eval.chat_template."""

    def validate(self, mode: str) -> None:
        """Check this section for algorithm.mode `mode`; ConfigError naming the field."""
        positive("data.max_prompt_length", self.max_prompt_length)
        positive("data.prompts_per_step", self.prompts_per_step)
        if not isinstance(self.chat_template, bool):
            fail("data.chat_template", self.chat_template, "true | false")
        if self.chat_template and str(self.tokenizer or "").endswith(".model"):
            fail("data.chat_template", self.chat_template,
                 "false with a sentencepiece .model tokenizer (it has no chat template)")
        if mode == "rlvr" and not self.answer_key:
            fail("data.answer_key", self.answer_key,
                 "a column name (mode rlvr needs true answers)")


@dataclass
class TrainingConfig:
    """The run."""

    steps: int = 10
    """Training steps (one rollout batch each)."""

    seed: int = 1234
    """Global seed (data order, sampling, dropout)."""

    run_dir: str = "runs/default"
    """Where metrics, plots and checkpoints go."""

    save_interval: int = 0
    """Checkpoint every this many steps (0: only at the end)."""

    eval_interval: int = 0
    """Validation every this many steps (0: never)."""

    eval_samples: int = 4
    """Completions per validation prompt: val_accuracy is their mean (pass@1), val_maj their
    majority vote's accuracy (maj@k)."""

    max_eval_prompts: int = 0
    """Evaluate on at most this many validation prompts (0: all)."""

    resume: bool = False
    """Continue from the newest checkpoint in run_dir (one that loads: a damaged newest one is
    skipped, with a line saying why)."""

    overwrite: bool = False
    """Start afresh in a run_dir that already holds a run, deleting its metrics and
    checkpoints (without it, or `resume`, such a start is refused)."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or grad norm is not finite: `stop` the run (saving nothing from that
    step: the newest checkpoint stays the last good one) or `skip` its update (the weights,
    optimizer state and EMA stay as before it) and go on."""

    stop_file: Optional[str] = None
    """When this file exists at the end of a step, save a checkpoint and stop (the slurm
    launchers create it on the time-limit signal and requeue the job, which resumes)."""

    def validate(self) -> None:
        """Check this section; ConfigError naming the field."""
        positive("training.steps", self.steps)
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            fail("training.run_dir", self.run_dir, "a directory (this path is a file)")
        positive("training.eval_samples", self.eval_samples)
        one_of("training.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        if self.resume and self.overwrite:
            fail("training.overwrite", self.overwrite, "false with training.resume (choose one)")
        for name in ("save_interval", "eval_interval"):
            if getattr(self, name) < 0:
                fail(f"training.{name}", getattr(self, name), "an integer >= 0")
