"""The configuration: typed sections (schema), the named choices (choices), their checks (checks) and how a preset,
a YAML file and --set overrides become one checked Config (loading). Values live in YAML presets (presets/)."""

from disback.config.loading import build_config, from_dict, load_preset, merge, parse_overrides, preset_names
from disback.config.schema import (
    Config,
    DataConfig,
    DegradeConfig,
    DistillConfig,
    EDMConfig,
    EvalConfig,
    NetworkConfig,
    RunConfig,
    TeacherConfig,
    TextConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "DegradeConfig",
    "DistillConfig",
    "EDMConfig",
    "EvalConfig",
    "NetworkConfig",
    "RunConfig",
    "TeacherConfig",
    "TextConfig",
    "build_config",
    "from_dict",
    "load_preset",
    "merge",
    "parse_overrides",
    "preset_names",
]
