"""Runs from the `soup` CLI against a real `prefect server start` process: the API going away for a moment in
the middle of a run, and two runs of the same experiment at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from model_soups.config import RunConfig, StorageConfig
from model_soups.storage import Store
from tests.conftest import free_port, small_digits

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
OUTAGE_S = 10


class PrefectServer:
    """`prefect server start` as a process of its own, stopped and started again on the same port and database."""

    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.env.pop("PREFECT_API_URL", None)
        self.log = open(home / "server.log", "ab")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}; see {self.log.name}")
            time.sleep(0.5)
        raise RuntimeError(f"prefect server did not answer on {self.url} within 90 s; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group, a second one, then SIGKILL: only what this test started."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture
def server(tmp_path):
    server = PrefectServer(tmp_path)
    server.start()
    yield server
    server.stop()


def run_flow(config_file: Path, server: PrefectServer) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config_file)], cwd=REPO,
                            env={**os.environ, "PREFECT_API_URL": server.url}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def completed_metas(root: Path, experiment: str = "api") -> dict[str, Path]:
    metas = {}
    for path in (root / experiment / "ingredients").glob("*/meta.json"):
        if json.loads(path.read_text())["status"] == "completed":
            metas[path.parent.name] = path
    return metas


def test_run_survives_the_prefect_api_going_away_and_loses_nothing(server, tmp_path):
    root = tmp_path / "storage"
    data = small_digits(f"file://{root}", experiment="api", n=6, max_steps=[120])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))

    flow = run_flow(config_file, server)
    deadline = time.time() + 240
    while not completed_metas(root) and flow.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flow.poll() is None, flow.stdout.read()
    server.stop()  # the API is gone while fine-tunes are running
    time.sleep(OUTAGE_S)
    server.start()
    output, _ = flow.communicate(timeout=400)
    assert flow.returncode == 0, output  # Prefect's client retried while the API was away
    assert "run folder: file://" in output

    store = Store(StorageConfig(root=f"file://{root}"))
    stored = completed_metas(root)
    assert len(stored) == 6
    for path in stored.values():  # every stored checkpoint is whole and matches its recorded sha256
        meta = json.loads(path.read_text())
        assert store.sha256(meta["checkpoint"]) == meta["sha256"]
    runs = httpx.post(f"{server.url}/flow_runs/filter", json={}, timeout=10).json()
    (soup_run,) = [r for r in runs if r["name"] and not r["name"].startswith("finetune")]
    assert soup_run["state_type"] == "COMPLETED"

    before = {name: path.stat().st_mtime_ns for name, path in stored.items()}
    again = run_flow(config_file, server)
    output, _ = again.communicate(timeout=400)
    assert again.returncode == 0, output
    assert {name: path.stat().st_mtime_ns for name, path in completed_metas(root).items()} == before  # all reused


def test_two_runs_of_one_experiment_at_once_make_everything_once(server, tmp_path):
    """Each ingredient, the pretrained start, each evaluation and each soup is made by one run; the other waits for it
    under its lease and reuses it."""
    root = tmp_path / "storage"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(small_digits(f"file://{root}", experiment="twice", n=4, max_steps=[60])))
    runs = [run_flow(config_file, server) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    stored = completed_metas(root, "twice")
    assert len(stored) == 4
    for ingredient_id in stored:  # one run trained it; the other found it busy, waited, and reused the result
        trained = sum(output.count(f"ingredient {ingredient_id}: trained") for output in outputs)
        reused = sum(output.count(f"ingredient {ingredient_id}: reused") for output in outputs)
        assert (trained, reused) == (1, 1), (ingredient_id, outputs)
    made = "\n".join(outputs)
    assert len(re.findall(r"pretrained \S+: built in", made)) == 1, outputs
    for ingredient_id in stored:
        assert len(re.findall(rf"ingredient {ingredient_id} on val: accuracy", made)) == 1, (ingredient_id, outputs)
    for method in RunConfig().soup.methods:
        cooked = re.findall(rf"(?<![\w-]){method} soup [0-9a-f]+: \d+ ingredients, val", made)
        reused = re.findall(rf"(?<![\w-]){method} soup [0-9a-f]+: reused", made)
        assert (len(cooked), len(reused)) == (1, 1), (method, outputs)
    store = Store(StorageConfig(root=f"file://{root}"))
    for path in stored.values():
        meta = json.loads(path.read_text())
        assert store.sha256(meta["checkpoint"]) == meta["sha256"]
    manifests = [json.loads(p.read_text()) for p in (root / "twice" / "runs").glob("*/manifest.json")]
    assert len(manifests) == 2 and manifests[0]["soups"]["greedy"] == manifests[1]["soups"]["greedy"]  # one soup
    assert not list(root.rglob("*.partial-*")) and not list(root.rglob("lease.json")) and not list(root.rglob("*.lease"))


def test_a_soup_run_from_the_cli_shows_up_in_make_ui(tmp_path):
    """`soup run` with no PREFECT_HOME keeps its runs in the checkout's .prefect/, which `make ui` serves."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "prefect.yaml").write_text("name: stand-in for the checkout\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(small_digits(f"file://{tmp_path}/store", experiment="home", n=2)))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL",
                                                            "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
    cli = (f"import sys; from pathlib import Path; import flows.cli as cli; cli.CHECKOUT = Path({str(checkout)!r}); "
           f"sys.exit(cli.main(['run', {str(config_file)!r}]))")
    run = subprocess.run([sys.executable, "-c", cli], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    run_id = next(line for line in run.stdout.splitlines() if line.startswith("run folder:")).rsplit("/", 1)[1]

    ui = PrefectServer(checkout / ".prefect")  # what `make ui` starts: PREFECT_HOME=<checkout>/.prefect
    ui.start()
    try:
        runs = httpx.post(f"{ui.url}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [f"home-{run_id}"]}}}).json()
    finally:
        ui.stop()
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
