"""Bad input is refused early with an error that names the field and what to do."""

from __future__ import annotations

import pytest

from model_soups.config import ConfigError, RunConfig, StorageConfig, parse_config
from model_soups.config_files import load_config
from model_soups.context import make_plan
from model_soups.recipes.base import get_recipe
from model_soups.storage import StorageError, Store
from model_soups.sweep import expand


def test_unknown_field_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"soup\.rulez: unknown field; allowed: methods, final, rule"):
        parse_config({"soup": {"rulez": ">"}})


def test_wrong_literal_names_field_and_value():
    with pytest.raises(ConfigError, match=r"soup\.rule: .*'>=' or '>'.*got '=>'"):
        parse_config({"soup": {"rule": "=>"}})


def test_set_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("experiment: x\nsweep:\n  n: 3\n")
    config = load_config(path, ["sweep.n=5", "soup.methods=[greedy]", "soup.final=greedy"])
    assert config.sweep.n == 5 and config.soup.methods == ["greedy"] and config.experiment == "x"
    with pytest.raises(ConfigError, match=r"sweep\.n: .*greater than or equal to 1"):
        load_config(path, ["sweep.n=0"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["sweep.n"])


def test_cooking_on_the_device_pool_needs_work_pool_mode():
    with pytest.raises(ConfigError, match=r"cook_on: device-pool .*set execution\.fanout: work-pool"):
        parse_config({"execution": {"cook_on": "device-pool"}})
    config = parse_config({"execution": {"fanout": "work-pool", "cook_on": "device-pool"}})
    assert config.execution.cook_deployment == "cook/gpu"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ""])
def test_experiment_name_cannot_escape_the_storage_root(name):
    with pytest.raises(ConfigError, match="experiment"):
        parse_config({"experiment": name})


@pytest.mark.parametrize("data, field", [
    ({"storage": {"root": "s3://AKIA:hunter2@bucket/x"}}, "storage.root"),
    ({"storage": {"endpoint_url": "http://minio:hunter2@127.0.0.1:9000"}}, "storage.endpoint_url"),
    ({"sweep": {"checkpoints": ["https://host/ckpt.safetensors?X-Amz-Signature=abc&X-Amz-Credential=AKIA"]}},
     r"sweep.checkpoints\[0\]"),
    ({"recipe": {"name": "text", "options": {"train": "https://x/train.csv?token=hunter2"}}}, "recipe.options.train"),
])
def test_credentials_in_any_url_are_refused_without_echoing_them(data, field):
    with pytest.raises(ConfigError, match=f"{field} must not carry credentials") as refused:
        parse_config(data)
    assert "hunter2" not in str(refused.value) and "abc" not in str(refused.value)


def test_unknown_recipe_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifar'; registered: digits, text"):
        get_recipe("cifar")


def test_unknown_recipe_option_is_named_with_the_recipes_own_options():
    with pytest.raises(ConfigError, match=r"recipe\.options\.widht: unknown field; allowed: .*\bwidth\b") as error:
        get_recipe("digits", {"widht": 3})
    assert "experiment" not in str(error.value)


def test_unknown_split_is_named_with_the_available_ones():
    recipe = get_recipe("digits")
    with pytest.raises(ConfigError, match=r"no split 'ood:snow'; splits: train, val, test, ood:rotate"):
        recipe.load_split("ood:snow")
    with pytest.raises(ConfigError, match=r"ood: unknown shift\(s\) \['snow'\]"):
        get_recipe("digits", {"ood": ["snow"]})


def test_digits_splits_that_leave_too_little_to_train_on_are_refused_before_any_training():
    config = parse_config({"recipe": {"name": "digits", "options": {"val_size": 1000, "test_size": 750}}})
    with pytest.raises(ConfigError, match=r"test_size \+ val_size = 1750 leaves fewer than 100 of the 1797 digits"):
        make_plan(config)


def test_empty_sweep_is_an_error_before_any_training():
    with pytest.raises(ConfigError, match="empty sweep"):
        make_plan(parse_config({"sweep": {"strategy": "grid", "params": {"lr": []}}}))


def test_a_sweep_of_one_is_refused_before_any_training_unless_asked_for():
    grid = {"sweep": {"strategy": "grid"}, "soup": {"methods": ["greedy", "uniform"]}}  # a grid with no grid
    with pytest.raises(ConfigError) as refused:
        make_plan(parse_config(grid))
    assert str(refused.value) == (
        "the sweep plans 1 ingredient(s), but execution.min_ingredients is 2. sweep.strategy grid trains one ingredient "
        "per combination of sweep.params, and there are none. Give more (sweep.n, more values in sweep.params, or "
        "sweep.checkpoints), or set execution.min_ingredients: 1 to train a single model on purpose")
    assert len(make_plan(parse_config({**grid, "execution": {"min_ingredients": 1}})).specs) == 1


def test_unknown_hyperparameter_in_the_sweep_is_named():
    with pytest.raises(ConfigError, match=r"sweep\.params\.learning_rate: not a hyperparameter .*allowed: lr,"):
        make_plan(parse_config({"sweep": {"params": {"learning_rate": [0.1]}}}))


def test_out_of_range_hyperparameter_is_named():
    with pytest.raises(ConfigError, match=r"invalid sweep\.params:\n  sweep\.params\.lr: Input should be greater than 0"):
        make_plan(parse_config({"sweep": {"strategy": "grid", "params": {"lr": [-1.0]}}}))


def test_final_soup_must_be_cooked():
    with pytest.raises(ConfigError, match="soup.final: 'greedy' is not among soup.methods"):
        make_plan(parse_config({"soup": {"methods": ["uniform"]}}))


def test_ingredient_ids_are_stable_and_depend_on_every_hyperparameter():
    recipe = get_recipe("digits")
    config = RunConfig()
    first = expand(config.sweep, recipe, "fp")
    again = expand(config.sweep, recipe, "fp")
    assert [s.id for s in first] == [s.id for s in again] and len(first) == config.sweep.n
    other_data = expand(config.sweep, recipe, "another-fingerprint")
    assert not {s.id for s in first} & {s.id for s in other_data}


def test_grid_is_every_combination():
    recipe = get_recipe("digits")
    space = parse_config({"sweep": {"strategy": "grid", "params": {"lr": [0.001, 0.002], "seed": [0, 1, 2]}}}).sweep
    specs = expand(space, recipe, "fp")
    assert len(specs) == 6 and {(s.hparams["lr"], s.hparams["seed"]) for s in specs} == {
        (lr, seed) for lr in (0.001, 0.002) for seed in (0, 1, 2)}


def test_text_recipe_without_training_file_says_what_to_set():
    with pytest.raises(ConfigError, match="recipe.options.train: the text recipe needs a training file"):
        get_recipe("text")


def test_text_recipe_with_unloadable_model_says_what_to_pass(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    recipe = get_recipe("text", {"train": str(tmp_path / "train.csv"), "model": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError, match="cannot load model .*no-model.*local folder"):
        recipe.build_model()


@pytest.mark.parametrize("credentials", [True, False])
def test_a_dead_s3_endpoint_is_named_before_any_word_on_credentials(monkeypatch, credentials):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if credentials:
            monkeypatch.setenv(name, "k")
        else:  # botocore asks for credentials before it connects: the dead endpoint is still what is named
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    store = Store(StorageConfig(root="s3://bucket/prefix", endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StorageError) as refused:
        store.check_writable("exp")
    assert str(refused.value).startswith("storage root s3://bucket/prefix: the endpoint http://127.0.0.1:9 does not "
                                         "answer (ConnectionRefusedError: ")
    assert "credentials are checked once it answers" in str(refused.value) and "NoCredentials" not in str(refused.value)


def test_an_outage_is_waited_out_with_backoff_and_each_wait_logged_then_refused_naming_the_setting(caplog):
    from botocore.exceptions import EndpointConnectionError

    store = Store(StorageConfig(root="file:///tmp", outage_s=4))
    calls = []

    def down_then_up(up_on: int):
        def operation():
            calls.append(1)
            if len(calls) < up_on:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
            return "read"
        return operation

    with caplog.at_level("WARNING", logger="model_soups.storage"):
        assert store.retrying("reading", "file:///tmp/x", down_then_up(3)) == "read"  # waits 1 s, then 2 s
    assert len(calls) == 3 and [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "does not answer: reading file:///tmp/x failed (EndpointConnectionError); trying again in 2s" in caplog.text
    calls.clear()
    with pytest.raises(StorageError, match=r"failed 3 times over 3s .*storage.outage_s sets how long an outage is "
                                           r"waited out"):
        store.retrying("reading", "file:///tmp/x", down_then_up(10))  # a third wait (4 s) would pass outage_s


def test_the_default_outage_budget_rides_out_90_seconds_with_bounded_waits():
    from model_soups.storage.store import MAX_WAIT_S

    waits, attempt = [], 1
    while sum(waits) + min(2.0 ** (attempt - 1), MAX_WAIT_S) <= StorageConfig().outage_s:
        waits.append(min(2.0 ** (attempt - 1), MAX_WAIT_S))
        attempt += 1
    assert sum(waits) >= 90 and max(waits) == MAX_WAIT_S <= 15
    with pytest.raises(ConfigError, match=r"storage.retries is now a time, not a count: write outage_s"):
        parse_config({"storage": {"retries": 3}})


def test_unwritable_local_root_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"cannot be written: writing \S+/exp/\.probe-\w+ failed \(NotADirectoryError"):
        Store(StorageConfig(root=f"file://{blocker}/root")).check_writable("exp")


def test_the_learned_soups_old_options_are_refused_with_their_new_place():
    with pytest.raises(ConfigError, match=r"learned_steps moved into the learned soup's own section: write "
                                          r"learned: \{steps: \.\.\.\} under soup"):
        parse_config({"soup": {"learned_steps": 5}})


def test_parsing_a_config_imports_neither_torch_nor_s3fs(tmp_path):
    """Config is plain data: the soup methods' and built-in recipes' declarations, with their options, are read
    without the maths (a YAML file checks in a fraction of a second, and a tool can read one without torch)."""
    import subprocess
    import sys

    config = tmp_path / "config.yaml"
    config.write_text("recipe: {name: text, options: {max_length: 64}}\nsoup: {methods: [greedy, ties, wiseft]}\n")
    script = ("import sys; from model_soups.config_files import load_config; c = load_config(sys.argv[1]);"
              "assert c.soup.ties.top_k and c.recipe.options.max_length == 64;"
              "print(sorted(m for m in ('torch', 's3fs', 'fsspec', 'scipy', 'numpy', 'pandas', 'transformers') "
              "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_every_declared_soup_method_has_one_body_and_a_colour():
    from model_soups.figures import COLORS, SOUPS
    from model_soups.methods import SOUP_METHODS
    from model_soups.soups import COOKS, soup_method

    assert list(COOKS) == list(SOUP_METHODS) and set(SOUPS) == set(SOUP_METHODS)  # each given its own colour
    assert len({COLORS[m.kind] for m in SOUP_METHODS.values()}) == len(SOUP_METHODS)  # a new one gets a spare
    with pytest.raises(ValueError, match="soup method 'fancy' is not declared in model_soups/methods.py"):
        soup_method("fancy")(lambda ctx, options: None)
