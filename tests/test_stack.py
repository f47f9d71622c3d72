"""End to end on a real stack: Prefect server, S3 endpoint, process workers, `prefect deploy --all`,
`prefect deployment run --watch`, and a worker killed in the middle of a fine-tune."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import s3fs

from model_soups.methods import SOUP_METHODS
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack_dir = tmp_path_factory.mktemp("stack")
    env = {**os.environ, "STACK_DIR": str(stack_dir), "PREFECT_PORT": str(free_port()), "S3_PORT": str(free_port()),
           "GPU_WORKERS": "2", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    up = subprocess.run([str(REPO / "infra/stack.sh"), "up"], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        resolved = subprocess.run(["bash", "-c", f"source {stack_dir}/env && env -0"], env=env, capture_output=True,
                                  text=True, check=True).stdout
        env = dict(item.split("=", 1) for item in resolved.split("\0") if "=" in item)
        env["PATH"] = f"{REPO / '.venv/bin'}:{env['PATH']}"
        yield {"env": env, "dir": stack_dir}
    finally:
        subprocess.run([str(REPO / "infra/stack.sh"), "down"], env=env, cwd=REPO, capture_output=True, timeout=120)


def prefect(stack, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["prefect", *args], env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def api(stack, path: str, body: dict | None = None):
    url = stack["env"]["PREFECT_API_URL"] + path
    response = httpx.post(url, json=body or {}) if body is not None else httpx.get(url)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="module")
def deployed(stack):
    result = prefect(stack, "deploy", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    return stack


def test_nightly_deployment_has_its_schedule_and_scheduled_runs(deployed):
    (nightly,) = api(deployed, "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["enforce_parameter_schema"] is True
    deadline, runs = time.time() + 90, []
    while not runs and time.time() < deadline:  # the server's scheduler creates the upcoming runs
        runs = api(deployed, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}})
        time.sleep(1)
    assert runs and all(r["state_type"] == "SCHEDULED" for r in runs), "the scheduler created no nightly runs"
    assert all(r["expected_start_time"].endswith("T02:00:00Z") for r in runs)


def test_invalid_parameter_is_refused_naming_the_field(deployed):
    result = prefect(deployed, "deployment", "run", "model-soup/on-demand", "--params", '{"config": {"soup": {"rule": "=>"}}}')
    output = result.stdout + result.stderr
    assert "config.soup.rule" in output and "'=>' is not one of" in output
    (on_demand,) = api(deployed, "/deployments/filter", {"deployments": {"name": {"any_": ["on-demand"]}}})
    assert not api(deployed, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [on_demand["id"]]}}})


def test_on_demand_form_shows_each_recipes_own_options_as_fields(deployed):
    (on_demand,) = api(deployed, "/deployments/filter", {"deployments": {"name": {"any_": ["on-demand"]}}})
    schema = on_demand["parameter_openapi_schema"]
    definitions = schema["definitions"]
    choices = definitions["RunConfig"]["properties"]["recipe"]["anyOf"]
    assert [c["$ref"].rsplit("/", 1)[1] for c in choices] == ["DigitsRecipe", "TextRecipe", "CustomRecipe"]
    assert definitions["DigitsRecipe"]["properties"]["name"]["const"] == "digits"
    assert definitions["DigitsRecipe"]["properties"]["options"]["$ref"].endswith("/DigitsOptions")
    width = definitions["DigitsOptions"]["properties"]["width"]
    assert width["type"] == "integer" and width["minimum"] == 4 and "average" in width["description"]
    assert "train" in definitions["TextOptions"]["properties"]
    soup = definitions["SoupOptions"]["properties"]
    assert soup["methods"]["items"]["enum"] == list(SOUP_METHODS)
    # each soup method's options are a section of their own, with their ranges: the form checks them as you type
    assert soup["ties"]["$ref"].endswith("/TiesOptions")
    top_k = definitions["TiesOptions"]["properties"]["top_k"]
    assert top_k["type"] == "array" and top_k["items"]["exclusiveMinimum"] == 0 and top_k["items"]["maximum"] == 100
    assert definitions["WiseFTOptions"]["properties"]["alpha"]["items"]["maximum"] == 1


def worker_of(pid: int, workers: dict[int, str]) -> int | None:
    """The recorded worker that `pid` descends from (walking /proc parent links)."""
    while pid > 1:
        if pid in workers:
            return pid
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return None
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


def logs_of(stack, flow_run_id: str) -> str:
    """The last lines of a flow run's log (its tasks' included), oldest first."""
    logs = api(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 200})
    return "\n".join(log["message"] for log in reversed(logs))


def test_pipeline_survives_a_worker_killed_mid_finetune(deployed):
    env = deployed["env"]
    fs = s3fs.S3FileSystem()
    fs_env = {"client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}, "key": env["AWS_ACCESS_KEY_ID"],
              "secret": env["AWS_SECRET_ACCESS_KEY"]}
    fs = s3fs.S3FileSystem(**fs_env)
    config = {"experiment": "e2e", "storage": {"root": "s3://soup-bucket/soups"},
              "recipe": {"name": "digits", "options": {"pretrain_examples": 2000, "pretrain_epochs": 2, "width": 16}},
              "sweep": {"n": 4, "seed": 1, "params": {"epochs": [30]}}, "soup": {"learned": {"steps": 5}},
              "execution": {"fanout": "work-pool", "lease_s": 5, "poll_s": 1, "retries": 2, "evaluate_on": "finetune-worker",
                            "cook_on": "device-pool"}}
    run = subprocess.Popen(["prefect", "deployment", "run", "model-soup/on-demand", "--params", json.dumps({"config": config}),
                            "--watch", "--watch-timeout", "500"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    workers = {int((deployed["dir"] / "pids" / f"worker-gpu-{i}").read_text()): f"gpu-{i}" for i in range(2)}
    killed, victim_ingredient = None, None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and run.poll() is None:
        for lease in fs.glob("soup-bucket/soups/e2e/ingredients/*/lease.json"):
            try:
                holder = json.loads(fs.cat(lease))
            except FileNotFoundError:
                continue
            worker = worker_of(int(holder["pid"]), workers)
            if worker is not None:
                os.killpg(worker, signal.SIGKILL)  # the worker, its flow run and its fine-tune process
                try:
                    os.killpg(os.getpgid(int(holder["pid"])), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed, victim_ingredient = workers[worker], lease.split("/")[-2]
                break
        fs.invalidate_cache()
        time.sleep(0.3)
    output, _ = run.communicate(timeout=520)
    assert killed is not None, "no fine-tune was seen running on a worker\n" + output
    assert run.returncode == 0 and "Flow run finished successfully in 'Completed'" in output, output[-3000:]

    # the killed fine-tune was marked Crashed, retried, and finished on the surviving worker
    runs = api(deployed, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "finetune-"}}})
    states = {}
    for flow_run in runs:
        states.setdefault(flow_run["name"], []).append(flow_run["state_type"])
    assert "CRASHED" in states[f"finetune-{victim_ingredient}"] and "COMPLETED" in states[f"finetune-{victim_ingredient}"]
    assert len(states) == 4 and all("COMPLETED" in s for s in states.values())
    meta = json.loads(fs.cat(f"soup-bucket/soups/e2e/ingredients/{victim_ingredient}/meta.json"))
    survivor = ({"gpu-0", "gpu-1"} - {killed}).pop()
    assert meta["slot"] == survivor

    # each ingredient was evaluated by its fine-tune run, on the worker's device
    finetune_run_ids = [r["id"] for r in runs if r["state_type"] == "COMPLETED"]
    evaluations = api(deployed, "/task_runs/filter", {"task_runs": {"name": {"like_": "evaluate-"}},
                                                      "flow_runs": {"id": {"any_": finetune_run_ids}}})
    assert len({t["name"] for t in evaluations}) == 4 * 5  # 4 ingredients x (val, test, 3 shifts)

    # the soups were cooked, the start evaluated and the run folder published by one run of cook/gpu on a GPU-pool
    # worker, each checkpoint read once through its pantry; the orchestrating run waited and read no checkpoint
    (soup_run,) = api(deployed, "/flow_runs/filter", {"flows": {"name": {"any_": ["model-soup"]}},
                                                      "flow_runs": {"name": {"like_": "e2e-"}}})
    run_id = soup_run["name"].removeprefix("e2e-")
    (cook_run,) = api(deployed, "/flow_runs/filter", {"flows": {"name": {"any_": ["cook"]}}})
    assert (cook_run["name"], cook_run["state_type"], cook_run["work_pool_name"]) == (f"cook-{run_id}", "COMPLETED", "gpu")
    tasks = api(deployed, "/task_runs/filter", {"task_runs": {"name": {"like_": "cook-"}}})
    cooks = [t for t in tasks if t["name"].endswith("-soup")]
    assert {t["name"] for t in cooks} == {f"cook-{m}-soup" for m in SOUP_METHODS}
    assert {t["flow_run_id"] for t in cooks} == {cook_run["id"]}
    assert [t["flow_run_id"] for t in tasks if not t["name"].endswith("-soup")] == [soup_run["id"]]  # cook-on-pool
    assert "cooking read its checkpoints through the pantry: 5 of 5 checkpoints held in memory" in logs_of(deployed, cook_run["id"])
    assert f"published s3://soup-bucket/soups/e2e/runs/{run_id}" in logs_of(deployed, cook_run["id"])
    started = api(deployed, "/task_runs/filter", {"task_runs": {"name": {"like_": "evaluate-pretrained-"}}})
    assert len(started) == 5 and {t["flow_run_id"] for t in started} == {cook_run["id"]}
    orchestrator = logs_of(deployed, soup_run["id"])
    assert re.search(r"cooked the soups on gpu-[01] \((cpu|cuda)\)", orchestrator)
    assert "this flow run read 0 checkpoint(s) from storage (0 distinct)" in orchestrator

    # both workers took work, everything is in the bucket, and the artifacts exist
    for i in range(2):
        assert "submitting flow run" in (deployed["dir"] / "logs" / f"worker-gpu-{i}.log").read_text()
    (run_folder,) = fs.ls("soup-bucket/soups/e2e/runs")
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(run_folder)}
    assert {"soup.safetensors", "manifest.json", "results.csv", "results.parquet", "report.md", "report.html"} <= listed
    artifacts = {a["key"]: a["flow_run_id"] for a in api(deployed, "/artifacts/filter", {"artifacts": {"key": {"like_": "e2e-"}}})}
    assert {"e2e-results", "e2e-report", "e2e-soup", "e2e-report-html", "e2e-finetune-progress"} <= set(artifacts)
    assert artifacts["e2e-report"] == soup_run["id"]  # the model-soup run shows the report the cook run published

    # run again, it resumes from the bucket: the pool verifies and reuses every ingredient and soup, and the
    # orchestrator reads one checkpoint, the pretrained start it reuses
    again = prefect(deployed, "deployment", "run", "model-soup/on-demand", "--params", json.dumps({"config": config}),
                    "--watch", "--watch-timeout", "300", timeout=320)
    watched = again.stdout + again.stderr
    assert again.returncode == 0 and "Flow run finished successfully in 'Completed'" in watched, watched[-3000:]
    (second,) = [r for r in api(deployed, "/flow_runs/filter", {"flows": {"name": {"any_": ["model-soup"]}},
                                                               "flow_runs": {"name": {"like_": "e2e-"}}})
                 if r["id"] != soup_run["id"]]
    resumed = logs_of(deployed, second["id"])
    assert "4 ingredients ready (4 reused, 0 supplied, 0 trained), 0 left out" in resumed
    assert f"{len(SOUP_METHODS)} soups ({len(SOUP_METHODS)} reused)" in resumed
    assert "this flow run read 1 checkpoint(s) from storage (1 distinct)" in resumed
