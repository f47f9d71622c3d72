"""The `soup` command: run the flow on a config, the demo, list an experiment's runs, rebuild a report, push a
run's Hugging Face folder, inspect a checkpoint, print the default config.

Only the standard library is imported at start, so `--version` and `--help` answer at once; each command imports
what it needs (torch, pandas, the library). Prefect is imported only once a flow runs, after `prefect_defaults` has
chosen its home: the checkout's `.prefect/` (the one `make ui` serves) unless PREFECT_HOME is set, with analytics
off unless asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_soups.config import RunConfig
    from model_soups.storage import Store

CHECKOUT = Path(__file__).resolve().parents[1]


def prefect_defaults(environ: dict[str, str], checkout: Path) -> None:
    """One Prefect home for the CLI and `make ui`, and no analytics, unless the environment says otherwise."""
    if (checkout / "prefect.yaml").is_file():
        environ.setdefault("PREFECT_HOME", str(checkout / ".prefect"))
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    environ.setdefault("DO_NOT_TRACK", "1")
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")


def preflight(config: RunConfig) -> None:
    """Fail in seconds on a bad config or an unusable storage root, before any run starts."""
    from model_soups.context import RunContext

    ctx = RunContext.of(config)
    ctx.store.check_writable(config.experiment)
    print(f"experiment {config.experiment}: {len(ctx.plan.specs)} ingredients of recipe {config.recipe.name!r}, "
          f"splits {', '.join(ctx.plan.splits)}, storage {ctx.store.root}")


def run(config: RunConfig) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.model_soup import model_soup
    from flows.server import temporary_server
    from model_soups import report
    from model_soups.config import StorageConfig
    from model_soups.storage import Store

    preflight(config)
    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():  # no server named: a temporary one, that cannot outlive this process
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: temporary_server(stack, CHECKOUT)}))
        paths = model_soup(config=config)
    store = Store(StorageConfig(root=paths["run"], endpoint_url=config.storage.endpoint_url))
    print(f"\nrun folder: {paths['run']}\n")
    print(report.markdown_table(report.summary(report.read_results(store, store.root))))
    print(f"\nsoup:   {paths['soup']}\nreport: {paths['report.html']}")
    return 0


def find_run(target: str, experiment: str | None, root: str | None) -> str:
    """The URL of a published run folder, from its path or URL, or from a run id as `soup runs` prints it (under
    `--experiment`, or the one experiment under the root that has it)."""
    from model_soups.config import StorageConfig
    from model_soups.storage import Layout, RunFolder, StorageError, Store, as_url

    url = as_url(target)
    store = Store(StorageConfig(root=url))
    if store.exists(RunFolder(url).manifest):
        return url
    if store.is_file(url):
        raise StorageError(f"{target} is a file, not a run folder: soup report takes a run folder (.../runs/<run_id>) "
                           "or a run id from `soup runs <experiment>`; `soup inspect` describes a checkpoint")
    if "/" in target or "://" in target:
        raise StorageError(f"{target} is not a published run folder: it has no manifest.json. Give a run folder "
                           "(.../<experiment>/runs/<run_id>) or a run id from `soup runs <experiment>`")
    store = Store(StorageConfig(root=as_url(root or StorageConfig().root)))
    experiments = [experiment] if experiment else [child.rsplit("/", 1)[1] for child in store.children(store.root)]
    found = [run.url for run in (Layout(store, name).run(target) for name in experiments) if store.exists(run.manifest)]
    if len(found) == 1:
        return found[0]
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not found:
        raise StorageError(f"no published run {target!r} in {where} under {store.root}: `soup runs <experiment>` "
                           "lists the run ids; give --root for another storage root")
    raise StorageError(f"run id {target!r} is in {len(found)} experiments under {store.root}: "
                       f"{', '.join(url.rsplit('/', 3)[1] for url in found)}; name one with --experiment")


def report_command(target: str, experiment: str | None, root: str | None) -> int:
    from model_soups.config import StorageConfig
    from model_soups.report import build_report
    from model_soups.storage import Store

    store = Store(StorageConfig(root=find_run(target, experiment, root)))
    paths = build_report(store, store.root)
    print("\n".join(paths.values()))
    return 0


def runs_command(experiment: str, root: str | None) -> int:
    """An experiment's published runs, oldest first, with what each final soup scored, and whether each file the
    manifest lists still has its sha256."""
    import pandas as pd

    from model_soups import report
    from model_soups.config import StorageConfig
    from model_soups.manifest import Manifest
    from model_soups.storage import RunFolder, Store, as_url

    store = Store(StorageConfig(root=as_url(root or StorageConfig().root)))
    rows, unfinished = [], []
    for url in store.children(store.url(experiment, "runs")):
        run = RunFolder(url)
        if not store.exists(run.manifest):
            unfinished.append(url.rsplit("/", 1)[1])  # a run that stopped while publishing, or is publishing now
            continue
        manifest = Manifest.read(store, run.manifest)
        final = report.summary(report.read_results(store, url)).loc[f"{manifest.final}_soup"]
        changed = [name for name, sha in manifest.files.items() if store.sha256(run.file(name)) != sha]
        rows.append({"run_id": manifest.run_id, "created": manifest.created[:19], "final": manifest.final,
                     "ingredients": f"{manifest.soup_ingredients} of {len(manifest.ingredients)}",
                     **{split: final[split] for split in ("val", "test", "ood_mean") if split in final},
                     "files": f"CHANGED since published: {', '.join(changed)}" if changed else "as published"})
    if unfinished:
        print(f"soup: not listed, as not (yet) published (no manifest.json): {', '.join(unfinished)}. A rerun of the same "
              "config completes such a folder; `soup report` refuses it meanwhile", file=sys.stderr)
    if not rows:
        print(f"soup: no published runs of experiment {experiment!r} under {store.root}", file=sys.stderr)
        return 1
    print(report.markdown_table(pd.DataFrame(rows)))
    return 0


def push_command(run_url: str, repo: str, private: bool) -> int:
    """Push a run's Hugging Face folder (hf/) to the Hub with huggingface_hub; the token comes from `hf auth login`
    or HF_TOKEN. Not tested against the Hub: these machines cannot reach it."""
    from huggingface_hub import HfApi

    from model_soups.config import StorageConfig
    from model_soups.storage import RunFolder, StorageError, Store, as_url

    run = RunFolder(as_url(run_url))
    store = Store(StorageConfig(root=run.url))
    files = store.children(run.file("hf"))
    if not files:
        raise StorageError(f"run {run.url} has no Hugging Face folder (hf/): only recipes that wrap a transformers "
                           "model publish one, such as text")
    with tempfile.TemporaryDirectory() as folder:
        for url in files:
            (Path(folder) / url.rsplit("/", 1)[1]).write_bytes(store.read_bytes(url))
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo, commit_message=f"model soup from {run.url}")
    print(f"pushed {len(files)} files to {commit.repo_url}")
    return 0


def inspect_command(url: str) -> int:
    """Keys, dtypes, shapes and metadata on stdout; the sha256's progress bar on stderr, and only on a terminal."""
    from tqdm import tqdm

    from model_soups.config import StorageConfig
    from model_soups.storage import Store, as_url

    url = as_url(url)
    store = Store(StorageConfig(root=url.rsplit("/", 1)[0]))
    with store.open_checkpoint(url) as reader:
        for name, info in reader.info.items():
            print(f"{name:60s} {str(info.dtype).replace('torch.', ''):9s} {tuple(info.shape)}")
        if reader.metadata:
            print(f"metadata: {reader.metadata}")
    with tqdm(total=reader.size, unit="B", unit_scale=True, desc="sha256", file=sys.stderr, disable=None) as bar:
        sha = store.sha256(url, bar.update)
    print(f"{len(reader.info)} tensors, {reader.size} bytes, sha256 {sha}")
    recorded = recorded_sha256(store, url)
    if recorded is None:
        return 0
    where, expected = recorded
    if sha == expected:
        print(f"matches the sha256 recorded in {where}")
        return 0
    print(f"soup: {url} has changed since it was recorded: {where} says sha256 {expected}", file=sys.stderr)
    return 1


def recorded_sha256(store: Store, url: str) -> tuple[str, str] | None:
    """The sha256 the pipeline recorded for a checkpoint, and where: a published run's manifest.json beside it, or
    an ingredient's meta.json; None for a file the pipeline did not write."""
    from model_soups.manifest import Manifest
    from model_soups.records import IngredientRecord

    folder, name = url.rsplit("/", 1)
    manifest, meta = f"{folder}/manifest.json", f"{folder}/meta.json"
    if store.exists(manifest) and (sha := Manifest.read(store, manifest).files.get(name)):
        return manifest, sha
    if store.exists(meta) and (sha := IngredientRecord.read(store, meta).sha256):
        return meta, sha
    return None


# `soup demo`: the default config in float64, so that every CPU trains the same fine-tunes and prints the same table,
# on sweep seed 3: of seeds 0-9, the one whose greedy soup holds (>= 3 kept, above the best fine-tune on mean OOD) with
# the OOD gain nearest the mean of all ten (bench/RESULTS.md, "The demo in float64")
DEMO = ["recipe.options.dtype=float64", "sweep.seed=3"]


def main(argv: list[str] | None = None) -> int:
    prefect_defaults(os.environ, CHECKOUT)
    parser = argparse.ArgumentParser(prog="soup", description="Model soups on Prefect")
    parser.add_argument("--version", action="version", version=f"soup {importlib.metadata.version('model-soups')}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the model_soup flow on a YAML config")
    run_parser.add_argument("config", type=Path)
    demo_parser = commands.add_parser("demo", help="run the embedded default (digits, in float64: the same table on "
                                          "every CPU) with local storage")
    for sub in (run_parser, demo_parser):
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field, e.g. --set sweep.n=4 (repeatable)")
    report_parser = commands.add_parser("report", help="rebuild report.md/html and the figures of a published run")
    report_parser.add_argument("run", help="a run folder (path or URL), or a run id as `soup runs` prints it")
    report_parser.add_argument("--experiment", help="the run id's experiment (default: the one that has it)")
    commands.add_parser("inspect", help="keys, shapes, dtypes and sha256 of a checkpoint (path or URL)").add_argument(
        "checkpoint_url")
    runs_parser = commands.add_parser("runs", help="an experiment's published runs and their soups' accuracy")
    runs_parser.add_argument("experiment")
    for sub in (runs_parser, report_parser):
        sub.add_argument("--root", help="the storage root (default: storage.root's default, as in `soup config`)")
    push_parser = commands.add_parser("push", help="push a run's Hugging Face folder to the Hub (untested here)")
    push_parser.add_argument("run_url")
    push_parser.add_argument("--repo", required=True, help="the Hub repository, user/name")
    push_parser.add_argument("--private", action="store_true")
    config_parser = commands.add_parser("config", help="print the default config as commented YAML")
    config_parser.add_argument("--defaults", action="store_true", required=True)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, with its own usage, not the top level's
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    from model_soups.storage import StorageError
    from model_soups.validation import ConfigError

    try:
        if args.command == "run":
            from model_soups.config_files import load_config

            return run(load_config(args.config, args.overrides))
        if args.command == "demo":
            from model_soups.config_files import load_config

            return run(load_config(None, DEMO + args.overrides))
        if args.command == "report":
            return report_command(args.run, args.experiment, args.root)
        if args.command == "push":
            return push_command(args.run_url, args.repo, args.private)
        if args.command == "runs":
            return runs_command(args.experiment, args.root)
        if args.command == "config":
            from model_soups.config_files import default_yaml

            print(default_yaml(), end="")
            return 0
        return inspect_command(args.checkpoint_url)
    except (ConfigError, StorageError, ValueError) as error:
        print(f"soup: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
