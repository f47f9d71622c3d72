"""Configs in and out of YAML: a file with `--set key.path=value` flags into a `RunConfig`, and the default config as
a commented file to start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from model_soups.config import RunConfig, parse_config
from model_soups.validation import ConfigError


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. --set sweep.n=4")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({error})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path}: not valid YAML ({error})") from None
        if data is None and not overrides:  # most likely the wrong file: never fall back to the full default demo
            raise ConfigError(f"config file {path}: empty. Give at least the fields that differ from the defaults "
                              "(`soup config --defaults` prints them all), or run `soup demo`")
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data)


def default_yaml() -> str:
    """The default config as YAML, every field under its description: a file to start from."""
    lines = ["# model-soup run config: every field with its default (soup run CONFIG.yaml; soup config --defaults)"]

    def emit(model: BaseModel, indent: str) -> None:
        values = model.model_dump(mode="json")
        for name, field in type(model).model_fields.items():
            if field.description:
                lines.append(f"{indent}# {field.description}")
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(value, indent + "  ")
            else:
                dumped = yaml.safe_dump({name: values[name]}, sort_keys=False, default_flow_style=False, width=1000)
                lines.extend(indent + line for line in dumped.rstrip().splitlines())

    emit(RunConfig(), "")
    return "\n".join(lines) + "\n"
