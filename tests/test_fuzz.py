"""Fuzzing of the config, `--set` overrides, recipe options, sweeps and names: a clear error or a valid config.

Every invalid input must raise ConfigError naming the field; any other exception is a traceback from deep
inside, which is what these tests look for.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from model_soups.config import ConfigError, RunConfig, SearchSpace, StorageConfig, parse_config
from model_soups.config_files import load_config
from model_soups.recipes.base import get_recipe
from model_soups.storage import Layout, Store
from model_soups.sweep import expand

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def field_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths += field_paths(field.annotation, f"{path}.")
    return paths


PATHS = field_paths()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(PATHS), st.text(max_size=20),
                 st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(PATHS), st.text(max_size=8)))
yaml_text = st.one_of(st.text(max_size=30), st.sampled_from(
    ["", "[]", "{}", "[1, 2", "{a: 1}", "-1", "1e999", ".nan", "!!python/object:os.system x", "2020-01-01", "~",
     "s3://user:pw@bucket/x", "../../etc", "'>'", "'>='", "auto", "0", "true", "[uniform, greedy]", "*anchor"]))


def set_in(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[parts[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), values), max_size=4))
def test_any_config_is_valid_or_refused_naming_the_field(assignments):
    data: dict[str, Any] = {}
    for path, value in assignments:
        set_in(data, path, value)
    try:
        parse_config(data)
    except ConfigError as error:
        lines = str(error).splitlines()
        assert lines[0] == "invalid config:" and len(lines) > 1
        named = [line.strip().split(":", 1)[0] for line in lines[1:]]
        assert all(name == "config" or name.split(".")[0] in RunConfig.model_fields for name in named), lines


@FUZZ
@given(st.lists(st.tuples(keys, yaml_text), min_size=1, max_size=3))
def test_any_set_override_is_valid_or_refused_naming_the_field(overrides):
    flags = [f"{key}={value}" for key, value in overrides]
    try:
        load_config(None, flags)
    except ConfigError as error:
        message = str(error)
        named_by_flag = message.startswith("--set ")
        firsts = [flag.partition("=")[0].strip().split(".")[0] for flag in flags]  # a key may itself hold a "="
        named_by_field = message.startswith("invalid config:") and any(
            first in message or repr(first) in message for first in firsts)
        assert named_by_flag or named_by_field, message


@FUZZ
@given(st.dictionaries(st.sampled_from(["val_size", "test_size", "ood", "pretrain_epochs", "width", "split_seed", "x"]),
                       values, max_size=3))
def test_any_recipe_options_are_valid_or_refused_naming_the_option(options):
    try:
        get_recipe("digits", options)
    except ConfigError as error:
        assert "recipe.options" in str(error) and any(name in str(error) for name in options), str(error)


@pytest.fixture(scope="module")
def digits():
    return get_recipe("digits", {"width": 4})


HPARAMS = ["lr", "weight_decay", "epochs", "batch_size", "warmup_fraction", "label_smoothing", "mixup", "augment",
           "seed", "max_steps", "momentum"]
choices = st.one_of(st.lists(scalars, max_size=3),
                    st.fixed_dictionaries({"low": st.floats(allow_nan=True), "high": st.floats(allow_nan=True),
                                           "log": st.booleans()}))


@FUZZ
@given(st.dictionaries(st.sampled_from(HPARAMS), choices, max_size=3), st.sampled_from(["grid", "random"]),
       st.integers(1, 5))
def test_any_sweep_gives_ingredients_or_an_error_naming_the_parameter(digits, params, strategy, n):
    try:
        space = SearchSpace.model_validate({"strategy": strategy, "n": n, "params": params})
    except ValueError:
        return  # refused by the config model, whose messages the tests above cover
    try:
        specs = expand(space, digits, "fingerprint")
    except ConfigError as error:
        assert "sweep" in str(error), str(error)
        return
    assert specs and all(len(spec.id) == 16 for spec in specs)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.sampled_from(
    ["..", "../x", "a/../../b", "/etc", "file:///etc", "s3://other/x", "%2e%2e", "a\\..\\b", ".hidden", "a..b",
     "x" * 129, "a b", "é", "a\x00b"])))
def test_experiment_names_cannot_escape_the_storage_root(tmp_path_factory, name):
    try:
        config = parse_config({"experiment": name, "storage": {"root": "file:///srv/soups"}})
    except ConfigError as error:
        assert "experiment" in str(error)
        return
    layout = Layout(Store(config.storage), config.experiment)
    for url in (layout.meta("id"), layout.run("run").soup, layout.pretrained("fp")):
        path = os.path.normpath(url.removeprefix("file://"))
        assert path.startswith("/srv/soups/") and path.split("/")[3] == name


@FUZZ
@given(st.one_of(st.text(max_size=40), st.builds(lambda p, r: f"{p}://{r}", st.sampled_from(
    ["file", "s3", "gs", "http", "memory", "S3", ""]), st.text(max_size=20))))
def test_any_storage_root_is_valid_or_refused_naming_it(root):
    try:
        parse_config({"storage": {"root": root}})
    except ConfigError as error:
        assert "storage.root" in str(error), str(error)
    else:
        assert StorageConfig(root=root).root.split("://", 1)[0] in ("file", "s3", "memory")
