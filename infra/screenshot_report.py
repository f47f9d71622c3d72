"""A picture of the report artifact as a Prefect user sees it: a Prefect server on 127.0.0.1, a small demo run
against it, then headless Chromium on the artifact's page.

    .venv/bin/python infra/screenshot_report.py [out.png] [--artifact NAME] [key=value ...]   (or: make screenshot)

key=value pairs are passed to `soup demo --set` (the demo runs 4 ingredients unless told otherwise). --artifact
names another of the run's artifacts than `report`: `results`, `finetune-progress`, `sweep-stop` (with a sweep.stop
set), ...

Needs Debian's chromium (`apt-get install chromium`). Everything it starts is stopped at the end, by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """A Prefect server in the background may ignore the first SIGTERM: a second one follows, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str]) -> int:
    out = Path(next((a for a in argv if a.endswith(".png")), "report-artifact.png")).resolve()
    overrides = [a for a in argv if "=" in a]
    artifact = argv[argv.index("--artifact") + 1] if "--artifact" in argv else "report"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot: chromium is not installed; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="soup-screenshot-"))
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            print("screenshot: the Prefect server did not answer within 90 s", file=sys.stderr)
            return 1
        sets = []
        for item in [f"storage.root=file://{work}/runs", "experiment=screenshot", "sweep.n=4", *overrides]:
            sets += ["--set", item]
        subprocess.run([sys.executable, "-m", "flows.cli", "demo", *sets], env=env, cwd=REPO, check=True)
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": [f"screenshot-{artifact}"]}},
                                                                "sort": "CREATED_DESC", "limit": 1}).json()
        page = f"{api.removesuffix('/api')}/artifacts/artifact/{artifacts[0]['id']}"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium'}", f"--screenshot={out}",
                        "--window-size=1400,4200", page], check=True, capture_output=True)
        print(f"{out}: the {artifact} artifact at {page}")
        return 0
    finally:
        stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
