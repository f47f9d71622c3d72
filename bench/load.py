"""Load: 64 ingredients of a small model through the local flow and through the stack.

Brings up the stack (`infra/stack.sh`: Prefect server, S3 endpoint, 1 orchestrator and 2 GPU-pool workers),
with the server's database on SQLite and/or PostgreSQL (`STACK_DB=postgres`), then
- local: `soup run` with local storage and device slots, against that server, at N = 16 and N = 64;
- stack: `prefect deployment run model-soup/on-demand --watch` in work-pool mode with S3 storage, N = 64.
For each: wall time, the peak RSS of the model-soup flow process (sampled from /proc; VmHWM), the peak RSS of
any fine-tune flow run process, the flow and task runs that did not complete, and the server's errors: ERROR
lines in its log, and how many of them were "database is locked".

    python bench/load.py [--n 64] [--db sqlite|postgres|both] [--skip-stack]     # about 15 min per database
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"name": "digits", "options": {"pretrain_epochs": 2, "width": 8}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config(experiment: str, root: str, n: int, **execution) -> dict:
    return {"experiment": experiment, "storage": {"root": root}, "recipe": RECIPE,
            "sweep": {"n": n, "seed": 3, "params": {"epochs": [2], "max_steps": [20]}},
            "soup": {"learned": {"steps": 5}}, "execution": {"device_slots": 2, **execution}}


class PeakMemory:
    """Samples /proc every 0.2 s: VmHWM per process whose environment names a flow run (PREFECT__FLOW_RUN_ID),
    or of one given pid."""

    def __init__(self, pid: int | None = None):
        self.pid, self.by_flow_run, self.of_pid = pid, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            pids = [self.pid] if self.pid else [int(p) for p in os.listdir("/proc") if p.isdigit()]
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
                    if pid == self.pid:
                        self.of_pid = max(self.of_pid, hwm)
                        continue
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except (OSError, AttributeError):
                    continue
                run_id = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PREFECT__FLOW_RUN_ID=")), None)
                if run_id:
                    self.by_flow_run[run_id] = max(self.by_flow_run.get(run_id, 0), hwm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def api(url: str, path: str, body: dict) -> list[dict]:
    rows, offset = [], 0
    while True:
        batch = httpx.post(f"{url}{path}", json={**body, "limit": 200, "offset": offset}, timeout=30).json()
        rows += batch
        offset += len(batch)
        if len(batch) < 200:
            return rows


def not_completed(url: str, flow_run_ids: list[str]) -> dict[str, int]:
    flows = api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}})
    bad_flows = [f for f in flows if f["state_type"] != "COMPLETED"]
    bad_tasks = [t for t in tasks if t["state_type"] != "COMPLETED"]
    return {"flow_runs": len(flows), "flow_runs_not_completed": len(bad_flows), "task_runs": len(tasks),
            "task_runs_not_completed": len(bad_tasks)}


def server_errors(log: Path, since: int) -> dict[str, int]:
    with open(log, "rb") as handle:
        handle.seek(since)
        lines = handle.read().decode(errors="replace").splitlines()
    return {"server_errors": sum(1 for line in lines if "| ERROR" in line),
            "database_locked": sum(1 for line in lines if line.startswith("sqlite3.OperationalError: database is locked"))}


def local_run(env: dict, n: int, workdir: Path) -> dict:
    config_file = workdir / f"local-{n}.yaml"
    config_file.write_text(yaml.safe_dump(config(f"load-local-{n}", f"file://{workdir}/storage", n)))
    server_log = Path(env["STACK_DIR"]) / "logs" / "server.log"
    log_start = server_log.stat().st_size
    started = time.time()
    flow = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config_file)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(flow.pid)
    output, _ = flow.communicate()
    memory.stop()
    wall = time.time() - started
    if flow.returncode != 0:
        raise RuntimeError(f"local run N={n} failed:\n{output[-4000:]}")
    runs = api(env["PREFECT_API_URL"], "/flow_runs/filter", {})
    run_ids = [r["id"] for r in runs if r["parameters"].get("config", {}).get("experiment") == f"load-local-{n}"]
    return {"mode": "local", "n": n, "wall_s": round(wall, 1), "flow_peak_rss_mb": round(memory.of_pid / 2**20, 1),
            "finetune_peak_rss_mb": None, **not_completed(env["PREFECT_API_URL"], run_ids),
            **server_errors(server_log, log_start)}


def stack_run(env: dict, n: int) -> dict:
    server_log = Path(env["STACK_DIR"]) / "logs" / "server.log"
    log_start = server_log.stat().st_size
    params = {"config": config(f"load-stack-{n}", env["SOUP_STORAGE_ROOT"], n, fanout="work-pool", poll_s=2)}
    memory = PeakMemory()
    started = time.time()
    run = subprocess.run(["prefect", "deployment", "run", "model-soup/on-demand", "--params", json.dumps(params),
                          "--watch", "--watch-timeout", "3000"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - started
    memory.stop()
    if run.returncode != 0:
        raise RuntimeError(f"stack run N={n} failed:\n{(run.stdout + run.stderr)[-4000:]}")
    url = env["PREFECT_API_URL"]
    runs = api(url, "/flow_runs/filter", {"flow_runs": {"id": {"any_": list(memory.by_flow_run)}}})
    names = {r["id"]: r["name"] for r in runs}
    soup_ids = [i for i in memory.by_flow_run if not names.get(i, "finetune-").startswith("finetune-")]
    finetune_ids = [i for i in memory.by_flow_run if names.get(i, "").startswith("finetune-")]
    return {"mode": "stack", "n": n, "wall_s": round(wall, 1),
            "flow_peak_rss_mb": round(max(memory.by_flow_run[i] for i in soup_ids) / 2**20, 1),
            "finetune_peak_rss_mb": round(max(memory.by_flow_run[i] for i in finetune_ids) / 2**20, 1),
            **not_completed(url, soup_ids + finetune_ids), **server_errors(server_log, log_start)}


def stack_env(stack_dir: Path) -> dict:
    resolved = subprocess.run(["bash", "-c", f"source {stack_dir}/env && env -0"], capture_output=True, text=True,
                              check=True).stdout
    env = dict(item.split("=", 1) for item in resolved.split("\0") if "=" in item)
    env["PATH"] = f"{REPO / '.venv/bin'}:{env['PATH']}"
    return {**env, "STACK_DIR": str(stack_dir)}


def load_runs(db: str, n: int, skip_stack: bool) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"soup-load-{db}-"))
    stack_dir = workdir / "stack"
    env = {**os.environ, "STACK_DIR": str(stack_dir), "PREFECT_PORT": str(free_port()), "S3_PORT": str(free_port()),
           "PG_PORT": str(free_port()), "GPU_WORKERS": "2", "STACK_DB": db}
    subprocess.run([str(REPO / "infra/stack.sh"), "up"], env=env, cwd=REPO, check=True, capture_output=True)
    rows = []
    try:
        env = stack_env(stack_dir)
        for size in sorted({16, n}):
            rows.append({"db": db, **local_run(env, size, workdir)})
            print(rows[-1], flush=True)
        if not skip_stack:
            subprocess.run(["prefect", "deploy", "--all"], cwd=REPO, env=env, check=True, capture_output=True)
            rows.append({"db": db, **stack_run(env, n)})
            print(rows[-1], flush=True)
    finally:
        subprocess.run([str(REPO / "infra/stack.sh"), "down"], env={**os.environ, "STACK_DIR": str(stack_dir)}, cwd=REPO,
                       capture_output=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"],
                        default="postgres" if shutil.which("initdb") else "sqlite",
                        help="the Prefect server's database (default: PostgreSQL, the production one, where installed)")
    parser.add_argument("--skip-stack", action="store_true", help="only the local flow")
    args = parser.parse_args()
    rows = []
    for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
        rows += load_runs(db, args.n, args.skip_stack)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    Path(REPO / "bench/results").mkdir(exist_ok=True)
    record = {"machine": f"{os.cpu_count()} cores", "command": " ".join(["python", *sys.argv]), "rows": rows}
    (REPO / "bench/results/load.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
