"""The config tree (`schema`: the root, its sections beside it) and its strict YAML +
command-line loader (`loader`). Nothing here imports the components that read the config."""

from megatron_mgrpo.config.loader import config_to_dict, dump_config, field_docs, load_config
from megatron_mgrpo.config.schema import (AlgorithmConfig, Config, ConfigError, DataConfig,
                                          DiagnosticsConfig, EvalConfig, LoggingConfig,
                                          ModelConfig, OptimizerConfig, ParallelConfig,
                                          RolloutConfig, SGLangConfig, TrainingConfig)

__all__ = [
    "Config", "ModelConfig", "ParallelConfig", "RolloutConfig", "SGLangConfig",
    "AlgorithmConfig", "OptimizerConfig", "DataConfig", "TrainingConfig", "EvalConfig",
    "LoggingConfig", "DiagnosticsConfig", "ConfigError", "load_config", "dump_config",
    "config_to_dict", "field_docs",
]
