"""The `soup` command and what users hand it, without a flow run: paths, Hugging Face folders, errors and usage,
the default config, the Prefect home."""
from __future__ import annotations

import pytest
import torch

from flows.cli import main, prefect_defaults
from model_soups.config import ConfigError, RunConfig, StorageConfig, parse_config
from model_soups.config_files import load_config
from model_soups.recipes.base import get_recipe
from model_soups.storage import Store
from model_soups.sweep import expand


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "models" / "soup.safetensors"
    Store(StorageConfig(root=f"file://{tmp_path}")).save_checkpoint(f"file://{path}", {"w": torch.ones(2, 3)})
    return path


@pytest.mark.parametrize("form", ["absolute", "relative", "file-url"])
def test_inspect_takes_an_absolute_path_a_relative_path_and_a_file_url(checkpoint, form, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint.parent.parent)
    given = {"absolute": str(checkpoint), "relative": "models/soup.safetensors", "file-url": f"file://{checkpoint}"}[form]
    assert main(["inspect", given]) == 0
    assert "1 tensors, " in capsys.readouterr().out


def test_a_plain_path_in_sweep_checkpoints_becomes_a_file_url(checkpoint, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    space = parse_config({"sweep": {"checkpoints": ["soup.safetensors"], "n": 1}}).sweep
    recipe = get_recipe("digits")
    (spec,) = [s for s in expand(space, recipe, recipe.fingerprint()) if s.checkpoint]
    assert spec.checkpoint == f"file://{checkpoint}"


def test_an_empty_config_file_is_refused_unless_set_flags_supply_the_config(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty.yaml: empty\. .*soup demo"):
        load_config(empty)
    assert load_config(empty, ["experiment=from-flags"]).experiment == "from-flags"


def test_a_subcommand_error_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["run", "--n", "4", "x.yaml"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("usage: soup run ") and "unrecognized arguments: --n" in err


def test_version_and_the_commented_default_config(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("soup 0.")
    assert main(["config", "--defaults"]) == 0
    printed = capsys.readouterr().out
    assert "# channels of the first conv layer" in printed and "  width: 64" in printed
    (tmp_path / "defaults.yaml").write_text(printed)
    assert load_config(tmp_path / "defaults.yaml") == RunConfig()  # the printed file is the default config


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_answer_without_importing_torch_pandas_or_prefect(flag):
    import subprocess
    import sys

    probe = ("import sys\nfrom flows.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'prefect', 'pandas', 'model_soups.config') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe % flag], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"  # none of them imported
    assert done.stdout.startswith("usage: soup" if flag == "--help" else "soup 0.")


def test_the_cli_shares_the_checkouts_prefect_home_and_keeps_analytics_off(tmp_path):
    (tmp_path / "prefect.yaml").write_text("name: x\n")
    environ: dict[str, str] = {}
    prefect_defaults(environ, tmp_path)
    assert environ["PREFECT_HOME"] == str(tmp_path / ".prefect")  # what `make ui` serves
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and environ["DO_NOT_TRACK"] == "1"
    chosen = {"PREFECT_HOME": "/elsewhere", "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    prefect_defaults(chosen, tmp_path)
    assert chosen["PREFECT_HOME"] == "/elsewhere" and chosen["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


def test_a_sharded_hugging_face_folder_joins_the_soup_as_its_unsharded_twin(tmp_path, monkeypatch):
    from huggingface_hub import save_torch_state_dict

    from model_soups.ingredients import register_checkpoint
    from model_soups.merge import Ingredient, weighted_average
    from model_soups.records import PretrainedRecord
    from model_soups.recipes.digits import DigitsNet
    from model_soups.storage import Layout

    torch.manual_seed(0)
    state = DigitsNet(width=8).state_dict()
    (tmp_path / "sharded").mkdir()
    (tmp_path / "whole").mkdir()
    save_torch_state_dict(state, tmp_path / "sharded", max_shard_size="3KB")  # several shards and an index
    save_torch_state_dict(state, tmp_path / "whole")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    store = Store(StorageConfig(root=f"file://{tmp_path}/store"))
    layout = Layout(store, "hf")
    pretrained_url = layout.pretrained("start")
    pretrained = PretrainedRecord(url=pretrained_url, sha256=store.save_checkpoint(pretrained_url, state), fingerprint="start")
    monkeypatch.chdir(tmp_path)
    space = parse_config({"sweep": {"checkpoints": ["sharded", "whole"], "n": 1}}).sweep
    recipe = get_recipe("digits", {"width": 8})
    specs = [s for s in expand(space, recipe, recipe.fingerprint()) if s.checkpoint]
    metas = [register_checkpoint(store, layout, spec, pretrained) for spec in specs]
    sharded, whole = (weighted_average(store, [Ingredient(m.id, m.checkpoint, m.sha256)]) for m in metas)
    assert sharded.keys() == whole.keys() == state.keys()
    assert all(torch.equal(sharded[name], whole[name]) for name in state)


@pytest.mark.slow
def test_a_killed_soup_does_not_leave_its_temporary_prefect_server_running(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    soup = subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--set", f"storage.root=file://{tmp_path}/runs",
                             "--set", "sweep.n=2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def servers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                if (f"PPid:\t{soup.pid}\n" in status
                        and b"prefect.server.api.server:create_app" in (entry / "cmdline").read_bytes()):
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
        return found

    deadline = time.time() + 120
    while not servers() and time.time() < deadline and soup.poll() is None:
        time.sleep(0.5)
    (server,) = servers()
    soup.send_signal(signal.SIGKILL)  # no atexit, no finally: only the watchdog can stop it now
    soup.wait()
    deadline = time.time() + 20
    while Path(f"/proc/{server}").exists() and time.time() < deadline:
        time.sleep(0.2)
    alive = Path(f"/proc/{server}/cmdline").exists() and b"create_app" in Path(f"/proc/{server}/cmdline").read_bytes()
    if alive:
        os.kill(server, signal.SIGKILL)  # the test cleans up after a failure; the assertion below still fails
    assert not alive, "the temporary Prefect server outlived the killed soup process"
