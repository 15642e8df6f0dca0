"""The M-GRPO training loop.

One step, in the method's order:
  1. roll out: M completions per prompt from the policy, N from the momentum model;
  2. vote over all M + N answers -> pseudo-label -> binary rewards (true labels only in rlvr);
  3. policy forward: old log-probs and token entropies of every completion;
  4. IQR entropy filter -> GRPO group advantages -> loss mask;
  5. update: PPO epochs x minibatches of clipped-surrogate steps;
  6. momentum model (EMA) update;
  7. push the new policy (and, every K steps, the momentum model) into the rollout engine.
Evaluation, checkpoints and metrics sit beside the loop, not inside the method.

The embedded rollout engine lives in global rank 0's process; rank 0 samples and broadcasts the
rollouts, so every rank builds the same global batch and takes its data-parallel shard of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mgrpo.checkpoint import latest_step, load_checkpoint, save_checkpoint, step_dir
from megatron_mgrpo.config import dump_config
from megatron_mgrpo.config.schema import Config, ConfigError
from megatron_mgrpo.eval_metrics import sample_accuracy
from megatron_mgrpo.models.architecture import complete, hf_config_dict
from megatron_mgrpo.models.policy import MegatronPolicy
from megatron_mgrpo.metrics import MetricsLogger, plot_metrics
from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
from megatron_mgrpo.parallel import ParallelContext, init_parallel
from megatron_mgrpo.rewards import get_grader
from megatron_mgrpo.update import (make_loss_fn, mode_plan, plan_update, score_groups,
                                   trained_columns)


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


def build_batch(prompt_ids: Sequence[Sequence[int]], groups, extract, decode, pad_id: int
                ) -> RolloutBatch:
    """Pack prompts and their completions ([P][G] engine Completions) into tensors."""
    rows, masks, lps, answers, lengths = [], [], [], [], []
    for prompt, completions in zip(prompt_ids, groups):
        group_answers = []
        for c in completions:
            rows.append(list(prompt) + list(c.token_ids))
            masks.append([0] * len(prompt) + [1] * len(c.token_ids))
            lps.append([0.0] * len(prompt) + list(c.logprobs))
            lengths.append(len(c.token_ids))
            group_answers.append(extract(decode(list(c.token_ids))))
        answers.append(group_answers)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    blp = torch.zeros(len(rows), width)
    for i, (r, m, lp) in enumerate(zip(rows, masks, lps)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
        blp[i, :len(lp)] = torch.tensor(lp)
    return RolloutBatch(ids, mask, blp, answers, torch.tensor(lengths, dtype=torch.float))


def _broadcast(obj, ctx: ParallelContext):
    """Rank 0's object on every rank (rollouts are sampled once, on rank 0)."""
    if ctx.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class Trainer:
    """Holds the run's pieces; `run()` is the loop."""

    def __init__(self, cfg: Config):
        from megatron_mgrpo.data.prompts import PromptSampler, load_prompts
        from megatron_mgrpo.data.tokenizer import load_tokenizer

        self.cfg = cfg
        self.ctx = init_parallel(cfg.parallel, seed=cfg.training.seed)
        torch.manual_seed(cfg.training.seed)
        r, a, d = cfg.rollout, cfg.algorithm, cfg.data
        self.plan = mode_plan(r, a)
        self.grader = get_grader(a.grader)
        self.is_main = self.ctx.rank == 0
        self.log = MetricsLogger(cfg.training.run_dir, cfg.training.steps, enabled=False)

        tok_path = d.tokenizer or cfg.model.load
        self.tokenizer = load_tokenizer(tok_path)
        self.train_set = load_prompts(d.train_path, d.prompt_key, d.answer_key, self.tokenizer,
                                      d.max_prompt_length, log=self._say)
        self.val_set = (load_prompts(d.val_path, d.prompt_key, d.answer_key, self.tokenizer,
                                     d.max_prompt_length, log=self._say)
                        if d.val_path else None)
        self.sampler = PromptSampler(self.train_set, d.prompts_per_step, seed=cfg.training.seed,
                                     shuffle=d.shuffle)

        updates = cfg.training.steps * a.ppo_epochs * a.ppo_minibatches
        self.policy = MegatronPolicy(cfg, self.ctx, total_steps=updates,
                                     temperature=r.temperature)
        if cfg.model.load:
            from megatron_mgrpo.weights.pretrained import load_pretrained

            load_pretrained(self.policy, cfg.model.load)
        # After the load: the EMA starts from the optimizer's main params.
        self.momentum = (ShardedMomentum(self.policy, MomentumSchedule.from_config(a))
                         if self.plan.use_momentum_model else None)
        self.engine = self._make_engine() if self.is_main else None
        self.loss_fn = make_loss_fn(a)
        self.step = 0
        self._benchmarks = None

    # ---- pieces -----------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        if self.is_main:
            self.log.write(line)

    def _make_engine(self):
        if self.cfg.rollout.backend == "sglang":
            from megatron_mgrpo.rollout.sglang_engine import make_sglang_engine

            r, model_path = self.cfg.rollout, self.cfg.model.load
            if r.weight_format == "fp8" and self.cfg.sglang.launch:
                model_path = self._fp8_base(model_path, r.fp8_block_size)
            return make_sglang_engine(self.cfg.sglang, model_path, r.weight_bucket_mb * 2 ** 20,
                                      self.cfg.training.run_dir, self._rollout_hf_config(),
                                      log=self._say)
        from megatron_mgrpo.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(self._rollout_hf_config())

    def _rollout_hf_config(self) -> dict:
        """The HF config of the model the engine serves (FP8 weights: with their format)."""
        hf_config = hf_config_dict(complete(self.cfg.model))
        if self.cfg.rollout.weight_format == "fp8":
            from megatron_mgrpo.weights.fp8 import quantization_config

            hf_config["quantization_config"] = quantization_config(
                self.cfg.rollout.fp8_block_size)
        return hf_config

    def _fp8_base(self, model_path: str, block_size: int) -> str:
        """The FP8 copy of model.load that launched servers start from (made once per run):
        SGLang only takes FP8 weight updates into a model it loaded as FP8."""
        from megatron_mgrpo.weights.fp8 import quantize_hf_dir

        if not model_path or not os.path.isdir(model_path):
            raise ConfigError("rollout.weight_format fp8 with sglang.launch: the servers start "
                              f"from an FP8 copy of model.load, an HF directory; got "
                              f"{model_path!r}")
        out = os.path.join(self.cfg.training.run_dir, f"rollout_base_fp8_b{block_size}")
        if not os.path.isdir(out):
            self._say(f"rollout: writing the FP8 copy of {model_path} that servers start from "
                      f"-> {out}")
            quantize_hf_dir(model_path, out, block_size, log=self._say)
        return out

    def push_args(self) -> dict:
        """How weights reach the engine (rollout.weight_format)."""
        r = self.cfg.rollout
        return {"bucket_bytes": r.weight_bucket_mb * 2 ** 20,
                "dtype": torch.bfloat16 if r.weight_format == "bf16" else None,
                "fp8_block_size": r.fp8_block_size if r.weight_format == "fp8" else None}

    def _sampling(self, seed: int, n_tokens: Optional[int] = None, temperature=None):
        from megatron_mgrpo.rollout.base import SamplingParams

        r = self.cfg.rollout
        return SamplingParams(temperature=temperature or r.temperature, top_p=r.top_p,
                              max_new_tokens=n_tokens or r.max_new_tokens,
                              stop_token_ids=list(self.tokenizer.stop_ids), seed=seed)

    def push_weights(self, momentum_too: bool) -> Dict[str, float]:
        from megatron_mgrpo.weights.push import push_weights

        t0 = time.time()
        push_weights(self.engine, self.policy, model="policy", version=self.step,
                     **self.push_args())
        if momentum_too and self.momentum is not None:
            push_weights(self.engine, self.policy, model="momentum", version=self.step,
                         momentum=self.momentum, **self.push_args())
        return {"push_time_s": time.time() - t0}

    def rollout(self, prompt_ids: List[List[int]]) -> RolloutBatch:
        """M completions per prompt from the policy and N from the momentum model."""
        groups = None
        if self.is_main:
            seed = self.cfg.training.seed * 1_000_003 + self.step
            plan = {"policy": (self.plan.num_policy, seed),
                    "momentum": (self.plan.num_momentum, seed + 500_009)}
            made = {}
            # With one group of servers for both sets, the set it holds goes first (no swap).
            for model in self.engine.generation_order([m for m in plan if plan[m][0]]):
                n, s = plan[model]
                made[model] = self.engine.generate(prompt_ids, n, self._sampling(s), model=model)
            groups = made["policy"]
            if "momentum" in made:
                groups = [a + b for a, b in zip(groups, made["momentum"])]
        groups = _broadcast(groups, self.ctx)
        return build_batch(prompt_ids, groups, self.grader.extract, self.tokenizer.decode,
                           self.tokenizer.pad_id)

    def _logprob_gap(self, batch: RolloutBatch, policy_logprobs: torch.Tensor) -> float:
        """Mean |engine - trainer| log-prob over the policy's completion tokens: the mismatch
        between the weights that sampled and the weights that train (FP8 rollout weights,
        kernels, a stale push would all show here)."""
        rows = torch.arange(batch.input_ids.shape[0])
        mask = batch.completion_mask * ((rows % self.plan.group_size) < self.plan.num_policy
                                        ).float()[:, None]
        gap = (batch.behaviour_logprobs - policy_logprobs.float().cpu()).abs() * mask
        return float(gap.sum() / mask.sum().clamp(min=1))

    def update(self, batch: RolloutBatch, advantages: torch.Tensor, loss_mask: torch.Tensor,
               old_logprobs: torch.Tensor) -> Dict[str, float]:
        """PPO epochs x minibatches over this step's rollouts (each rank its DP shard)."""
        a = self.cfg.algorithm
        rows = torch.arange(batch.input_ids.shape[0])
        # Trajectories of the momentum model have the engine's log-probs as behaviour policy.
        old = old_logprobs.clone()
        momentum_rows = (rows % self.plan.group_size) >= self.plan.num_policy
        old[momentum_rows] = batch.behaviour_logprobs[momentum_rows]
        full = {"input_ids": batch.input_ids, "loss_mask": loss_mask,
                "advantages": advantages, "old_logprobs": old}
        g = torch.Generator().manual_seed(self.cfg.training.seed + self.step)
        results = []
        last = a.ppo_epochs * a.ppo_minibatches
        for _ in range(a.ppo_epochs):
            order = torch.randperm(len(rows), generator=g) if a.ppo_minibatches > 1 else rows
            for part in order.chunk(a.ppo_minibatches):
                mini = {k: v[part] for k, v in full.items()}
                # The momentum model moves once per training step, inside its last update.
                ema = (self.momentum.fused_into_next_step(self.step)
                       if self.momentum is not None and len(results) + 1 == last
                       else contextlib.nullcontext())
                with ema:
                    results.append(self.policy.train_step(self.policy.dp_shard(mini),
                                                          self.loss_fn,
                                                          with_entropy=a.entropy_coef > 0))
        last = results[-1]
        out = {"loss": sum(r.loss for r in results) / len(results),
               "grad_norm": max(r.grad_norm for r in results), "lr": last.lr,
               "num_tokens": float(sum(r.num_tokens for r in results))}
        for k in last.metrics:
            out[k] = sum(r.metrics[k] for r in results) / len(results)
        return out

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """pass@1 (mean over k samples) and maj@k of the policy on the validation prompts."""
        if self.val_set is None:
            return {}
        rows = [self.val_set[i] for i in range(len(self.val_set))]
        if self.cfg.training.max_eval_prompts:
            rows = rows[:self.cfg.training.max_eval_prompts]
        result = None
        if self.is_main:
            groups = self.engine.generate([r.prompt_ids for r in rows],
                                          self.cfg.training.eval_samples,
                                          self._sampling(seed=12345), model="policy")
            answers = [[self.grader.extract(self.tokenizer.decode(list(c.token_ids)))
                        for c in comps] for comps in groups]
            acc = sample_accuracy(answers, [r.answer for r in rows], self.grader.equivalent)
            logprobs = [lp for comps in groups for c in comps for lp in c.logprobs]
            # The completions' mean token log-prob: a continuous fingerprint of the weights.
            result = {"val_accuracy": acc["pass@1"], "val_maj": acc["maj@k"],
                      "val_token_logprob": sum(logprobs) / max(len(logprobs), 1)}
        return _broadcast(result, self.ctx)

    def benchmarks(self):
        """eval.benchmarks, loaded on first use. Every rank loads them (only rank 0 samples), so
        a missing or bad file stops all ranks with the same error instead of hanging them."""
        from megatron_mgrpo.evaluation.harness import load_configured

        if self._benchmarks is None:
            self._benchmarks = load_configured(self.cfg.eval, self._say)
        return self._benchmarks

    @torch.no_grad()
    def evaluate_benchmarks(self) -> Dict[str, float]:
        """The policy's scores on eval.benchmarks, as `<benchmark>/<metric>` (rank 0 samples and
        grades; every rank gets the figures); the full report goes to
        `<eval output dir>/step_<N>.json`."""
        from megatron_mgrpo.evaluation.harness import flat_metrics, run_benchmarks
        from megatron_mgrpo.evaluation.run import output_dir, report

        flat = None
        if self.is_main:
            doc = run_benchmarks(self.engine, self.tokenizer, self.benchmarks(), self.cfg.eval,
                                 self.policy.model_cfg.max_position_embeddings,
                                 label=self.cfg.model.load or "random init", step=self.step,
                                 log=self._say)
            report(doc, os.path.join(output_dir(self.cfg), f"step_{self.step}.json"), self._say)
            flat = flat_metrics(doc)
        return _broadcast(flat, self.ctx)

    def stop_requested(self) -> bool:
        """Whether training.stop_file exists (rank 0 looks; every rank gets the answer)."""
        if not self.cfg.training.stop_file:
            return False
        return _broadcast(self.is_main and os.path.exists(self.cfg.training.stop_file),
                          self.ctx)

    def save(self) -> None:
        save_checkpoint(self.cfg.training.run_dir, self.step, self.policy, self.momentum,
                        {"data": self.sampler.state_dict(), "config": dump_config(self.cfg),
                         "hf_config": hf_config_dict(self.policy.model_cfg)})

    def resume(self) -> bool:
        last = latest_step(self.cfg.training.run_dir)
        if last is None:
            return False
        state = load_checkpoint(step_dir(self.cfg.training.run_dir, last), self.policy,
                                self.momentum)
        self.sampler.load_state_dict(state["data"])
        self.step = int(state["step"])
        return True

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> List[Dict[str, float]]:
        cfg, a, t = self.cfg, self.cfg.algorithm, self.cfg.training
        resumed = t.resume and self.resume()
        self.log = MetricsLogger(t.run_dir, t.steps, start_step=self.step, enabled=self.is_main,
                                 tensorboard=cfg.logging.tensorboard,
                                 progress_bar=cfg.logging.progress_bar)
        if resumed:
            self._say(f"resumed from step {self.step}")
        if self.is_main:  # the resolved config beside the metrics: the run is reproducible
            with open(os.path.join(t.run_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))
        self.push_weights(momentum_too=True)
        history = []
        bench_every = cfg.eval.interval if cfg.eval.benchmarks else 0
        if bench_every:  # a missing benchmark file fails now, not at step K
            self.benchmarks()
        if self.step == 0 and (t.eval_interval or bench_every):
            base = {"step": 0, **(self.evaluate() if t.eval_interval else {}),
                    **(self.evaluate_benchmarks() if bench_every else {})}
            self.log.write(f"step 0 (base): {_fmt(base)}")
            history.append(base)
            self.log.log(base, advance=False)
        while self.step < t.steps:
            t0 = time.time()
            self.step += 1
            prompts = self.sampler.next_batch()
            batch = self.rollout([p.prompt_ids for p in prompts])
            true = [p.answer for p in prompts]
            scored = score_groups(batch.answers, self.plan, self.grader.equivalent,
                                  a.min_agreement, true)
            old_logprobs, entropy = self.policy.logprobs_global(
                {"input_ids": batch.input_ids})
            trained = trained_columns(self.plan, len(prompts),
                                      torch.Generator().manual_seed(t.seed + self.step))
            plan = plan_update(scored, self.plan, a, entropy, batch.completion_mask, trained)
            metrics = {"step": self.step, **plan.metrics,
                       "rollout_logprob_gap": self._logprob_gap(batch, old_logprobs),
                       **self.update(batch, plan.advantages, plan.loss_mask, old_logprobs)}
            metrics.update(self.push_weights(
                momentum_too=self.step % cfg.rollout.momentum_push_interval == 0))
            metrics["completion_len"] = float(batch.completion_lengths.mean())
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                metrics.update(self.evaluate())
            if bench_every and (self.step % bench_every == 0 or self.step == t.steps):
                metrics.update(self.evaluate_benchmarks())
            metrics["step_time_s"] = time.time() - t0
            history.append(metrics)
            self.log.log(metrics)
            if self.step % cfg.logging.log_interval == 0:
                self.log.write(f"step {self.step}: {_fmt(metrics)}")
            saved = (t.save_interval and self.step % t.save_interval == 0) or self.step == t.steps
            if saved:
                self.save()
            if self.stop_requested():  # e.g. slurm's time-limit signal: save, exit, requeue
                if not saved:
                    self.save()
                self._say(f"stop requested ({t.stop_file}): saved step {self.step}, stopping")
                break
        if self.is_main:
            plot_metrics(t.run_dir)
        self.log.close()
        return history


_SHOWN = ("reward_mean", "vote_agreement", "pseudo_label_acc", "entropy_mean",
          "iqr_dropped_frac", "loss", "val_accuracy", "val_maj")


def _fmt(m: Dict[str, float]) -> str:
    return "  ".join(f"{k} {m[k]:.3f}" for k in _SHOWN if isinstance(m.get(k), float))


def train(cfg: Config) -> List[Dict[str, float]]:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        if trainer.engine is not None:  # launched rollout servers stop with the run
            trainer.engine.close()


def evaluate_checkpoint(cfg: Config, checkpoint: Optional[str] = None) -> Dict[str, float]:
    """Validation pass@1 / maj@k (data.val_path) and benchmark scores (eval.benchmarks) of a
    checkpoint (default: the run's newest; none: model.load)."""
    if not cfg.data.val_path and not cfg.eval.benchmarks:
        from megatron_mgrpo.config import ConfigError

        raise ConfigError("nothing to evaluate: set data.val_path (validation prompts) or "
                          "eval.benchmarks (e.g. --benchmarks math500,aime24)")
    trainer = Trainer(cfg)
    if checkpoint is None:
        last = latest_step(cfg.training.run_dir)
        checkpoint = step_dir(cfg.training.run_dir, last) if last is not None else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trainer.policy, trainer.momentum,
                                load_optimizer=False)
        trainer.step = int(state["step"])
    try:
        if cfg.eval.benchmarks:
            trainer.benchmarks()
        trainer.push_weights(momentum_too=False)
        result = trainer.evaluate()
        if trainer.is_main and result:
            source = checkpoint or cfg.model.load or "random init"
            print(f"{source}: val_accuracy (pass@1, k={cfg.training.eval_samples}) "
                  f"{result['val_accuracy']:.4f}  val_maj (maj@k) {result['val_maj']:.4f}")
        if cfg.eval.benchmarks:
            result.update(trainer.evaluate_benchmarks())
    finally:
        if trainer.engine is not None:
            trainer.engine.close()
    return result
