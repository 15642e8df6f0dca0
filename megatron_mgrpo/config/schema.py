"""The config tree: the root `Config`, one dataclass per concern, a docstring under every field.

The sections live beside this file, each with a `validate()` for its own fields: `model.py`
(model, parallel; reading an HF config.json), `rollout.py` (rollout, sglang), `training.py`
(algorithm, optimizer, data, training), `reporting.py` (eval, logging, diagnostics).
`Config.validate()` runs them all before anything is built and raises a one-line `ConfigError`
naming the field and the accepted values, so a bad config never surfaces as a trace from deep
inside megatron-core.

Layering: `config/` imports nothing from the package outside itself but the leaf modules that
hold a component's rules (`algorithm.modes`, `evaluation.catalog`); the components import the
config, never the reverse (tests/test_layering.py). This module re-exports every section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from megatron_mgrpo.config.checks import ConfigError, all_finite, fail
from megatron_mgrpo.config.model import (ARCHITECTURES, DTYPES, LLAMA3_ROPE_KEYS, ModelConfig,
                                         ParallelConfig, resolve)
from megatron_mgrpo.config.reporting import DiagnosticsConfig, EvalConfig, LoggingConfig
from megatron_mgrpo.config.rollout import RolloutConfig, SGLangConfig
from megatron_mgrpo.config.training import (AlgorithmConfig, DataConfig, OptimizerConfig,
                                            TrainingConfig)

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "RolloutConfig",
           "SGLangConfig", "AlgorithmConfig", "OptimizerConfig", "DataConfig", "TrainingConfig",
           "EvalConfig", "LoggingConfig", "DiagnosticsConfig", "ARCHITECTURES", "DTYPES",
           "LLAMA3_ROPE_KEYS"]


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's architecture."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/data parallel layout."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling from the policy and the momentum model."""

    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """SGLang rollout servers (used when rollout.backend is sglang)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The method (mode, vote, filter, loss, EMA)."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam settings and schedule."""

    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data and tokenizer."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Steps, seeds, checkpoints."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks (MATH500, AIME, GPQA, LiveCodeBench) and how they are sampled and graded."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""

    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    """Collapse alarms and the collapse step."""

    def resolve(self, given: Optional[Mapping[str, Iterable[str]]] = None) -> "Config":
        """This config with the effective model section: the base's architecture where
        model.load (or model.hf_config) names one (`config.model.resolve`). `given`: the keys
        written per section (`load_config` passes the file's and the overrides'); a written
        model field that disagrees with the base is a ConfigError."""
        given = given or {}
        return dataclasses.replace(self, model=resolve(self.model, set(given.get("model", ()))))

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every section and the constraints between them; raise ConfigError naming the
        field. `world_size`, when given, must be a multiple of the model-parallel size.
        Returns self."""
        all_finite(self)  # .inf / .nan in any float field, before any rule compares them
        model = self.model.validate()  # the architecture the layout is checked against
        if self.model.fp8_param_gather and (self.model.fp8 is None
                                            or not self.parallel.use_distributed_optimizer):
            fail("model.fp8_param_gather", True, "false, or true with model.fp8 set and "
                 "parallel.use_distributed_optimizer true")
        self.parallel.validate(model, world_size)
        self.rollout.validate()
        if self.rollout.backend == "sglang":
            self.sglang.validate()
        self.algorithm.validate(self.rollout)
        self.optimizer.validate()
        self.data.validate(self.algorithm.mode)
        self.training.validate()
        self.eval.validate()
        self.logging.validate()
        self.diagnostics.validate()
        self._check_lengths(model)
        self._check_minibatches()
        self._check_overlap()
        return self

    def _check_overlap(self) -> None:
        """What generating ahead needs: an engine that runs beside the trainer, completions to
        generate ahead, and the importance correction for one-step-stale policy samples."""
        r, a = self.rollout, self.algorithm
        if r.overlap == "none":
            return
        if r.backend != "sglang":
            fail("rollout.overlap", r.overlap, "none with rollout.backend embedded (the engine "
                 "must run in its own processes beside the trainer: rollout.backend sglang, "
                 "with `mgrpo serve` as the launch command for the embedded engine)")
        if r.overlap == "momentum" and a.mode != "mgrpo":
            fail("rollout.overlap", r.overlap, f"none or full in mode {a.mode} (no momentum "
                 "completions to generate ahead)")
        if r.momentum_push_interval != 1 and a.mode == "mgrpo":
            fail("rollout.momentum_push_interval", r.momentum_push_interval,
                 f"1 with rollout.overlap {r.overlap} (staleness is bounded to one step)")
        if r.overlap == "full" and a.tis_cap is None:
            fail("algorithm.tis_cap", None, "a number >= 1 with rollout.overlap full (the "
                 "policy's completions are one step stale: they need the importance weight)")

    def _check_lengths(self, model: ModelConfig) -> None:
        """A prompt and its completion fit in the model's context (positions beyond
        max_position_embeddings have no trained RoPE and overflow the rollout engine)."""
        ctx = model.max_position_embeddings
        base = self.model.hf_config or self.model.load
        where = f"model.max_position_embeddings={ctx}" + (
            f" (the config.json of {base!r})" if base else "")
        d, r, e = self.data, self.rollout, self.eval
        if d.max_prompt_length + r.max_new_tokens > ctx:
            raise ConfigError(f"data.max_prompt_length + rollout.max_new_tokens: got "
                              f"{d.max_prompt_length} + {r.max_new_tokens} = "
                              f"{d.max_prompt_length + r.max_new_tokens}; accepted: at most "
                              f"{where}")
        # Benchmarks run against a named base (or a run of one); the placeholder model of a
        # config without one (examples/eval/benchmarks.yaml before --model) is not checked.
        if e.benchmarks and base:
            if e.max_prompt_length and e.max_prompt_length + e.max_new_tokens > ctx:
                raise ConfigError(f"eval.max_prompt_length + eval.max_new_tokens: got "
                                  f"{e.max_prompt_length} + {e.max_new_tokens} = "
                                  f"{e.max_prompt_length + e.max_new_tokens}; accepted: at "
                                  f"most {where}")
            if e.max_new_tokens >= ctx:
                fail("eval.max_new_tokens", e.max_new_tokens,
                     f"less than {where}, leaving room for the prompt")

    def _check_minibatches(self) -> None:
        """Each PPO minibatch has rows to train on: at most as many minibatches as the step
        trains rows (prompts x the completions per prompt that get gradient in this mode)."""
        from megatron_mgrpo.algorithm.modes import plan_for_mode  # checked valid above

        a, r, d = self.algorithm, self.rollout, self.data
        mode = plan_for_mode(a.mode, r.num_policy_rollouts, r.num_momentum_rollouts,
                             a.iqr_filter, a.ttrl_num_train, a.train_on_momentum_rollouts)
        per_prompt = mode.num_train + (mode.num_momentum if mode.train_on_momentum_rollouts
                                       else 0)
        rows = d.prompts_per_step * per_prompt
        if a.ppo_minibatches > rows:
            fail("algorithm.ppo_minibatches", a.ppo_minibatches,
                 f"at most the {rows} rows a step trains (data.prompts_per_step="
                 f"{d.prompts_per_step} x {per_prompt} trained completions per prompt in mode "
                 f"{a.mode})")

