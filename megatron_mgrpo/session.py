"""A run's resources, built once from the config for one purpose and closed once.

`Session(cfg, purpose)` owns the parallel context, the tokenizer, the policy, the momentum
model, the reference model (when the KL needs one), the rollout engine and the grader:

| purpose | policy               | momentum model | reference model  | engine | tokenizer |
| ------- | -------------------- | -------------- | ---------------- | ------ | --------- |
| train   | with optimizer       | mgrpo          | kl_coef > 0      | yes    | yes       |
| eval    | frozen, no optimizer | no             | no               | yes    | yes       |
| smoke   | with optimizer       | mgrpo          | kl_coef > 0      | no     | no        |

Drivers (trainer.py, evaluation/checkpoint_eval.py, smoke.py) hold a Session; the one RL step
(step.py) is where its parts meet the algorithm. Nothing else builds these resources.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from megatron_mgrpo.config.schema import Config, ConfigError
from megatron_mgrpo.errors import CheckpointError
from megatron_mgrpo.models.architecture import complete, hf_config_dict
from megatron_mgrpo.models.policy import MegatronPolicy
from megatron_mgrpo.optim.momentum import MomentumSchedule, ShardedMomentum
from megatron_mgrpo.parallel import init_parallel
from megatron_mgrpo.rewards import get_grader
from megatron_mgrpo.update import mode_plan

PURPOSES = ("train", "eval", "smoke")


class Session:
    """See the module docstring. Use as a context manager, or call `close()`."""

    def __init__(self, cfg: Config, purpose: str = "train"):
        if purpose not in PURPOSES:
            raise ValueError(f"Session purpose {purpose!r}; accepted: {' | '.join(PURPOSES)}")
        if purpose == "train" and not cfg.data.train_path:
            raise ConfigError("data.train_path: got None; accepted: a jsonl or parquet file of "
                              "training prompts (mgrpo train needs one)")
        self.cfg, self.purpose = cfg, purpose
        self.engine = None
        self._sink: Callable[[str], None] = print
        try:
            self._build(cfg, purpose)
        except BaseException:  # a failure or a signal while building: stop what was started
            self.close()
            raise

    def _build(self, cfg: Config, purpose: str) -> None:
        self.ctx = init_parallel(cfg.parallel, seed=cfg.training.seed)
        self.is_main = self.ctx.rank == 0
        torch.manual_seed(cfg.training.seed)
        r, a = cfg.rollout, cfg.algorithm
        self.mode = mode_plan(r, a)
        self.grader = get_grader(a.grader)
        self.tokenizer = None
        if purpose != "smoke":
            from megatron_mgrpo.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.load)

        trains = purpose != "eval"
        updates = cfg.training.steps * a.ppo_epochs * a.ppo_minibatches
        self.policy = MegatronPolicy(cfg, self.ctx, total_steps=updates,
                                     temperature=r.temperature, trainable=trains)
        if cfg.model.load:
            from megatron_mgrpo.weights.pretrained import load_pretrained

            load_pretrained(self.policy, cfg.model.load)
        # After the load: the EMA starts from the optimizer's main params, the reference from
        # the initial weights.
        self.momentum = (ShardedMomentum(self.policy, MomentumSchedule.from_config(a))
                         if trains and self.mode.use_momentum_model else None)
        self.reference_model = None
        if trains and a.kl_coef > 0 and a.kl_reference == "base":
            self.reference_model = MegatronPolicy(cfg, self.ctx, temperature=r.temperature,
                                                  trainable=False, initialize=False)
            self.reference_model.copy_weights_from(self.policy)
        if purpose != "smoke" and self.is_main:
            from megatron_mgrpo.rollout.factory import make_engine

            sets = ("policy", "momentum") if trains else ("policy",)
            self.engine = make_engine(cfg, cfg.model.load, self.rollout_hf_config(), sets,
                                      log=self.say)

    # ---- output ---------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """A line for the user, from rank 0 (printed, or through the run's logger)."""
        if self.is_main:
            self._sink(line)

    def log_to(self, sink: Callable[[str], None]) -> None:
        """Send `say` lines here from now on (the training logger keeps its progress bar)."""
        self._sink = sink

    def broadcast(self, obj):
        """Rank 0's object on every rank (rollouts and evaluations happen on rank 0)."""
        if self.ctx.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    # ---- weights --------------------------------------------------------------------------

    def rollout_hf_config(self) -> dict:
        """The HF config of the model the engine serves (FP8 weights: with their format)."""
        hf_config = hf_config_dict(complete(self.cfg.model))
        if self.cfg.rollout.weight_format == "fp8":
            from megatron_mgrpo.weights.fp8 import quantization_config

            hf_config["quantization_config"] = quantization_config(
                self.cfg.rollout.fp8_block_size)
        return hf_config

    def push(self, version: int, momentum_too: bool) -> Dict[str, float]:
        """The policy's weights (and the momentum model's) into the engine, as `version`."""
        if self.purpose == "smoke":
            return {}
        from megatron_mgrpo.weights.push import push_weights

        r = self.cfg.rollout
        how = {"bucket_bytes": r.weight_bucket_mb * 2 ** 20,
               "dtype": torch.bfloat16 if r.weight_format == "bf16" else None,
               "fp8_block_size": r.fp8_block_size if r.weight_format == "fp8" else None}
        t0 = time.time()
        push_weights(self.engine, self.policy, model="policy", version=version, **how)
        if momentum_too and self.momentum is not None:
            push_weights(self.engine, self.policy, model="momentum", version=version,
                         momentum=self.momentum, **how)
        return {"push_time_s": time.time() - t0}

    @torch.no_grad()
    def reference_logprobs(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, S] log-probs of the KL's reference model (None without a KL term): the frozen
        base, or the momentum model's weights swapped into the policy for one forward."""
        a = self.cfg.algorithm
        if not a.kl_coef > 0:
            return None
        batch = {"input_ids": input_ids}
        if a.kl_reference == "momentum":
            with self.momentum.swapped_in(self.policy.parameters()):
                return self.policy.logprobs_global(batch, with_entropy=False)[0]
        return self.reference_model.logprobs_global(batch, with_entropy=False)[0]

    # ---- checkpoints ----------------------------------------------------------------------

    @property
    def _saved_reference(self):
        """The reference model goes into checkpoints only when model.load cannot rebuild it
        (a run from random init): a resumed run then anchors to the same weights at any
        layout."""
        return self.reference_model if not self.cfg.model.load else None

    def save(self, step: int, state: Dict) -> str:
        """A checkpoint of the run after `step`; CheckpointError, and nothing written, when the
        weights are not finite (a checkpoint to resume from must never hold NaN)."""
        from megatron_mgrpo.checkpoint import save_checkpoint
        from megatron_mgrpo.config import dump_config

        bad = self._nonfinite_tensors()
        if bad:
            raise CheckpointError(f"step {step}: {bad} of the weight tensors (policy, momentum "
                                  "model) hold inf or NaN: not saved, stopping")
        return save_checkpoint(self.cfg.training.run_dir, step, self.policy, self.momentum,
                               {**state, "config": dump_config(self.cfg),
                                "hf_config": hf_config_dict(self.policy.model_cfg)},
                               reference=self._saved_reference)

    @torch.no_grad()
    def _nonfinite_tensors(self) -> int:
        """How many of the policy's (and the EMA's) tensors hold inf or NaN, over all ranks."""
        tensors = list(self.policy.parameters())
        if self.momentum is not None:
            tensors += [e.ema for e in self.momentum.entries.values() if e.ema is not None]
        count = torch.tensor([float(sum(not bool(torch.isfinite(t).all()) for t in tensors))],
                             device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(count)
        return int(count.item())

    def load(self, path: str) -> Dict:
        """A checkpoint into the session's models (the optimizer too when training); returns
        the trainer state saved with it."""
        from megatron_mgrpo.checkpoint import load_checkpoint

        return load_checkpoint(path, self.policy, self.momentum,
                               load_optimizer=self.policy.trainable,
                               reference=self._saved_reference)

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop what the session started (launched rollout servers stop with it)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
