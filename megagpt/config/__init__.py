"""Configuration: dataclasses with documented fields, YAML files, dotted overrides."""

from megagpt.config.errors import ConfigError
from megagpt.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from megagpt.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from megagpt.config.validate import validate_config, validate_world_size

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "save_config",
    "validate_config",
    "validate_world_size",
]
