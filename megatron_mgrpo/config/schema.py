"""The config tree: the root `Config`, one dataclass per concern, a docstring under every field.

The sections live beside this file, each with a `validate()` for its own fields: `model.py`
(model, parallel; reading an HF config.json), `rollout.py` (rollout, sglang), `training.py`
(algorithm, optimizer, data, training), `reporting.py` (eval, logging). `Config.validate()` runs
them all before anything is built and raises a one-line `ConfigError` naming the field and the
accepted values, so a bad config never surfaces as a trace from deep inside megatron-core.

Layering: `config/` imports nothing from the package outside itself but the leaf modules that
hold a component's rules (`algorithm.modes`, `evaluation.catalog`); the components import the
config, never the reverse (tests/test_layering.py). This module re-exports every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_mgrpo.config.checks import ConfigError, fail
from megatron_mgrpo.config.model import (ARCHITECTURES, DTYPES, LLAMA3_ROPE_KEYS, ModelConfig,
                                         ParallelConfig)
from megatron_mgrpo.config.reporting import EvalConfig, LoggingConfig
from megatron_mgrpo.config.rollout import RolloutConfig, SGLangConfig
from megatron_mgrpo.config.training import (AlgorithmConfig, DataConfig, OptimizerConfig,
                                            TrainingConfig)

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "RolloutConfig",
           "SGLangConfig", "AlgorithmConfig", "OptimizerConfig", "DataConfig", "TrainingConfig",
           "EvalConfig", "LoggingConfig", "ARCHITECTURES", "DTYPES", "LLAMA3_ROPE_KEYS"]


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

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check every section and the constraints between them; raise ConfigError naming the
        field. `world_size`, when given, must be a multiple of the model-parallel size.
        Returns self."""
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
        return self

