"""Run configuration: pydantic models for every section of a search-space YAML file.

``read_config(path)`` reads a YAML file and returns a validated :class:`StudyConfig`; any problem
raises :class:`ConfigError` whose message is one line naming the YAML key path.
"""


from normsearch.config.run import (
    ConfigError,
    EnasConfig,
    FinalConfig,
    RayConfig,
    StudyConfig,
    SearchConfig,
    dump_config,
    format_validation_error,
    read_config,
    parse_config,
)
from normsearch.config.sections import (
    AugmentConfig,
    ChoiceConfig,
    CorruptionConfig,
    DataConfig,
    LayerRuleConfig,
    ModelConfig,
    OptimizerConfig,
    RangeConfig,
    ScheduleConfig,
    SpaceConfig,
    StdLossConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig", "ChoiceConfig", "ConfigError", "CorruptionConfig", "DataConfig", "EnasConfig", "FinalConfig", "LayerRuleConfig",
    "ModelConfig", "OptimizerConfig", "RangeConfig", "RayConfig", "StudyConfig", "ScheduleConfig", "SearchConfig",
    "SpaceConfig", "StdLossConfig", "TrainConfig", "dump_config", "format_validation_error", "parse_config",
    "read_config",
]
