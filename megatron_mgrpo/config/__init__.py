"""The config tree (`schema`) and its strict YAML + command-line loader (`loader`)."""

from megatron_mgrpo.config.loader import config_to_dict, dump_config, field_docs, load_config
from megatron_mgrpo.config.schema import (AlgorithmConfig, Config, ConfigError, DataConfig,
                                          LoggingConfig, ModelConfig, OptimizerConfig,
                                          ParallelConfig, RolloutConfig, TrainingConfig)

__all__ = [
    "Config", "ModelConfig", "ParallelConfig", "RolloutConfig", "AlgorithmConfig",
    "OptimizerConfig", "DataConfig", "TrainingConfig", "LoggingConfig", "ConfigError",
    "load_config", "dump_config", "config_to_dict", "field_docs",
]
