"""Reading a configuration: a preset (by name, or the user's YAML file), then the user's YAML file, then --set
overrides; typed by schema.py, checked by checks.py."""

from __future__ import annotations

import dataclasses
import difflib
import types
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from disback.config.checks import validate
from disback.config.schema import Config
from disback.errors import DisbackError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("disback.config.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``toy2d``) or a YAML file the user wrote."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DisbackError(f"config file {path} does not exist")
        return _read_yaml(path.read_text(), str(path))
    names = preset_names()
    if name_or_path not in names:
        hint = difflib.get_close_matches(name_or_path, names, n=1)
        raise DisbackError(
            f"unknown preset '{name_or_path}'"
            + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" Presets: {', '.join(names)}, or a path to a .yaml file."
        )
    return _read_yaml(
        resources.files("disback.config.presets").joinpath(f"{name_or_path}.yaml").read_text(), name_or_path
    )


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise DisbackError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DisbackError(f"{where} must hold a mapping of sections (data:, teacher:, ...), not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["distill.steps=500", "seed=3"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DisbackError(f"--set expects KEY=VALUE (e.g. distill.steps=500), got '{item}'")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def build_config(
    preset: str = "toy2d", config_file: str | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Preset, then the user's YAML file, then command-line overrides; typed and validated."""
    raw = load_preset(preset)
    if config_file:
        raw = merge(raw, load_preset(config_file))
    if overrides:
        raw = merge(raw, overrides)
    return validate(from_dict(Config, raw, ""))


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, naming any unknown, missing or mistyped key."""
    label = where or "the config"
    if not isinstance(raw, dict):
        raise DisbackError(f"{label} must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            raise DisbackError(
                f"unknown key '{_join(where, key)}'"
                + (f"; did you mean '{_join(where, hint[0])}'?" if hint else "")
                + f" Valid keys here: {', '.join(names)}."
            )
    values = {}
    optional = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif name not in optional:
            raise DisbackError(f"missing key '{_join(where, name)}' in the config")
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if get_origin(kind) in (Union, types.UnionType):  # e.g. float | list[float]: the first that fits
        for option in get_args(kind):
            try:
                return _coerce(option, value, where)
            except DisbackError:
                continue
        names = " or ".join(_name(option) for option in get_args(kind))
        raise DisbackError(f"'{where}' must be {names}, got {value!r}")
    if get_origin(kind) is list:
        if not isinstance(value, list):
            raise DisbackError(f"'{where}' must be a list, e.g. [32, 64], got {value!r}")
        return [_coerce(get_args(kind)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise DisbackError(f"'{where}' must be {_name(kind)}, got {value!r}")


def _name(kind: Any) -> str:
    return f"a list of {_name(get_args(kind)[0])}" if get_origin(kind) is list else kind.__name__
