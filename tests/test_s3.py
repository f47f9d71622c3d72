"""The whole flow with its storage root on an S3 endpoint over HTTP (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import s3fs
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from flows.model_soup import model_soup
from model_soups.config import parse_config
from model_soups.storage import StorageUnavailable
from tests.conftest import small_digits

pytestmark = pytest.mark.slow


SECRETS = ["config-key-AKIA7EXAMPLE", "config-secret-wJalrXUtnFEMI", "testing-key", "testing-secret"]


def test_flow_runs_with_storage_on_s3_and_no_credential_leaks(prefect_server, s3_endpoint):
    config = parse_config({**small_digits("s3://soup-bucket/soups", experiment="s3", n=3),
                           "storage": {"root": "s3://soup-bucket/soups", "endpoint_url": s3_endpoint,
                                       "key": SECRETS[0], "secret": SECRETS[1]}})
    state = model_soup(config=config, return_state=True)
    paths = state.result()
    assert paths["run"].startswith("s3://soup-bucket/soups/s3/runs/")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    run = paths["run"].removeprefix("s3://")
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"soup.safetensors", "manifest.json", "results.csv", "results.parquet", "report.md", "report.html"} <= listed
    manifest = json.loads(fs.cat(f"{run}/manifest.json"))
    assert all(i["checkpoint"].startswith("s3://soup-bucket/soups/s3/ingredients/") for i in manifest["ingredients"])
    assert len(fs.ls("soup-bucket/soups/s3/ingredients")) == 3

    # Every stored object (manifest, reports, meta.json, records, results), and everything Prefect keeps:
    # logs, the flow run's parameters, task runs and artifacts.
    scanned = {path: fs.cat(path) for path in fs.find("soup-bucket/soups/s3")}
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        scanned["parameters"] = json.dumps(client.read_flow_run(flow_run_id).parameters).encode()
        logs, offset = [], 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset):
            logs += batch
            offset += len(batch)
        scanned["logs"] = "\n".join(log.message for log in logs).encode()
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
        scanned["task runs"] = "\n".join(r.model_dump_json() for r in runs).encode()
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        scanned["artifacts"] = "\n".join(a.model_dump_json() for a in artifacts).encode()
    assert len(logs) > 20 and len(runs) > 20 and len(artifacts) >= 4
    assert b"greedy soup" in scanned["logs"] and b"s3://soup-bucket" in scanned["parameters"]
    # The soup and report links are presigned: they name the access key id (as every presigned URL does), never
    # the secret, and they expire.
    links = [a for a in artifacts if a.key in ("s3-soup", "s3-report-html")]
    assert len(links) == 2 and all("X-Amz-Signature=" in a.data and "X-Amz-Expires=86400" in a.data for a in links), \
        [a.data for a in links]
    scanned["artifacts"] = re.sub(rb"X-Amz-Credential=[^&\"]+", b"X-Amz-Credential=...", scanned["artifacts"])
    leaks = [(where, secret) for where, data in scanned.items() for secret in SECRETS if secret.encode() in data]
    assert not leaks


@pytest.fixture
def flaky_endpoint():
    """A moto server of its own, which the test stops and starts again on the same port (its data survive)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, so a second test that uses this fixture finds the bucket there already
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).makedirs("flaky-bucket",
                                                                                                   exist_ok=True)
    servers = [server]

    def restart() -> None:
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port))
        servers[-1].start()

    yield endpoint, server, restart
    servers[-1].stop()


def completed_metas(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, dict]:
    fs.invalidate_cache()
    metas = {}
    for path in fs.glob(f"{prefix}/ingredients/*/meta.json"):
        meta = json.loads(fs.cat(path))
        if meta["status"] == "completed":
            metas[meta["id"]] = {**meta, "modified": fs.info(path)["LastModified"]}
    return metas


def test_s3_down_mid_run_fails_after_bounded_retries_and_a_rerun_resumes(prefect_server, s3_endpoint, flaky_endpoint):
    endpoint, server, restart = flaky_endpoint
    root, prefix = "s3://flaky-bucket/soups", "flaky-bucket/soups/outage"
    data = small_digits(root, experiment="outage", n=6)
    data["storage"] = {"root": root, "endpoint_url": endpoint, "outage_s": 3}
    config = parse_config(data)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    before_outage: dict[str, dict] = {}

    def stop_after_two_ingredients() -> None:
        while len(before_outage) < 2:
            time.sleep(0.5)
            before_outage.update(completed_metas(fs, prefix))
        server.stop()

    watcher = threading.Thread(target=stop_after_two_ingredients, daemon=True)
    watcher.start()
    with pytest.raises(StorageUnavailable, match=rf"storage s3://flaky-bucket/soups \(endpoint {endpoint}\) is unreachable: "
                       r".* failed \d times over \d+s .*EndpointConnectionError.*Nothing stored is lost"):
        model_soup(config=config)
    watcher.join()
    assert 2 <= len(before_outage) < 6

    restart()
    paths = model_soup(config=config)
    after = completed_metas(fs, prefix)
    assert len(after) == 6
    for ingredient_id, meta in before_outage.items():  # finished before the outage: verified and reused, not redone
        assert after[ingredient_id]["modified"] == meta["modified"] and after[ingredient_id]["sha256"] == meta["sha256"]
    manifest = json.loads(fs.cat(f"{paths['run'].removeprefix('s3://')}/manifest.json"))
    assert len(manifest["ingredients"]) == 6 and not manifest["failed"]


def test_an_s3_outage_longer_than_the_old_retry_budget_is_waited_out_logged_and_nothing_is_retrained(
        prefect_server, s3_endpoint, flaky_endpoint):  # s3_endpoint: credentials in the env
    from prefect.logging.handlers import APILogHandler

    endpoint, server, restart = flaky_endpoint
    root, prefix = "s3://flaky-bucket/soups", "flaky-bucket/soups/waited"
    data = small_digits(root, experiment="waited", n=6)
    data["storage"] = {"root": root, "endpoint_url": endpoint}  # the default storage.outage_s
    data["execution"]["retries"] = 0  # a fine-tune that failed on the outage would not come back
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    before_outage: dict[str, dict] = {}

    def down_for_20s_after_two_ingredients() -> None:  # 20 s: more than the 7 s the old 3 retries waited
        while len(before_outage) < 2:
            time.sleep(0.5)
            before_outage.update(completed_metas(fs, prefix))
        server.stop()
        time.sleep(20)
        restart()

    watcher = threading.Thread(target=down_for_20s_after_two_ingredients, daemon=True)
    watcher.start()
    state = model_soup(config=parse_config(data), return_state=True)
    watcher.join()
    paths = state.result()  # completed, across the outage
    assert 2 <= len(before_outage) < 6
    after = completed_metas(fs, prefix)
    manifest = json.loads(fs.cat(f"{paths['run'].removeprefix('s3://')}/manifest.json"))
    assert len(after) == 6 and len(manifest["ingredients"]) == 6 and not manifest["failed"]
    for ingredient_id, meta in before_outage.items():  # nothing finished was trained again
        assert after[ingredient_id]["modified"] == meta["modified"]
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    waits = [log for log in logs if "does not answer" in log.message]
    assert waits and all(log.level == 30 and log.task_run_id for log in waits), [log.message for log in logs][-20:]
    assert f"storage {root} (endpoint {endpoint}) does not answer: " in waits[0].message


def test_s3_down_at_the_start_fails_in_the_preflight_before_any_training(prefect_server, monkeypatch):
    from model_soups.storage import StorageError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    config = parse_config({**small_digits("s3://soup-bucket/soups", experiment="down"),
                           "storage": {"root": "s3://soup-bucket/soups", "endpoint_url": "http://127.0.0.1:9"}})
    state = model_soup(config=config, return_state=True)
    assert state.is_failed()
    with pytest.raises(StorageError, match=r"storage root s3://soup-bucket/soups: the endpoint http://127.0.0.1:9 "
                                           r"does not answer \(ConnectionRefusedError"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert len(runs) == 1 and runs[0].name.startswith("prepare")  # no fine-tune was started


def test_a_checkpoint_read_cut_off_mid_file_resumes_where_it_stopped_and_still_verifies(s3_endpoint, flaky_endpoint,
                                                                                       caplog):
    import torch

    from model_soups.config import StorageConfig
    from model_soups.storage import CHUNK, Store

    endpoint, server, restart = flaky_endpoint
    store = Store(StorageConfig(root="s3://flaky-bucket/midfile", endpoint_url=endpoint, outage_s=60))
    state = {f"layer{i}": torch.randn(2 * CHUNK // 4) for i in range(3)}  # 8 MB each: several ranged reads apiece
    url = store.url("model.safetensors")
    sha = store.save_checkpoint(url, state)
    with caplog.at_level("WARNING", logger="model_soups"), store.open_checkpoint(url, sha) as reader:
        assert torch.equal(reader.tensor("layer0"), state["layer0"])
        server.stop()  # the endpoint goes away between two reads of one file
        threading.Timer(3, restart).start()
        rest = {name: reader.tensor(name).clone() for name in ("layer1", "layer2")}
    # the `with` verified the sha256 over every byte, the first tensor's included: nothing was read twice or skipped
    assert all(torch.equal(rest[name], state[name]) for name in rest)
    assert any(f"does not answer: reading {url} failed" in record.message for record in caplog.records)


def test_a_frozen_endpoint_is_a_failed_try_after_storage_request_timeout_s_and_is_waited_out(s3_endpoint, tmp_path,
                                                                                            caplog):
    """SIGSTOP: the endpoint still accepts connections but answers nothing. Each try gives up after
    storage.request_timeout_s, the wait is logged, and the call goes through once the endpoint thaws."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from model_soups.config import StorageConfig
    from model_soups.storage import Store
    from tests.conftest import free_port

    port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir("frozen-bucket")
        store = Store(StorageConfig(root="s3://frozen-bucket/x", endpoint_url=endpoint, request_timeout_s=1,
                                    outage_s=60))
        url = store.url("record.json")
        store.write_json(url, {"ok": 1})
        moto.send_signal(signal.SIGSTOP)
        threading.Timer(5, moto.send_signal, [signal.SIGCONT]).start()
        with caplog.at_level("WARNING", logger="model_soups"):
            assert store.read_json(url) == {"ok": 1}
        waits = [r.message for r in caplog.records if "does not answer" in r.message]
        assert waits and f"reading {url} failed" in waits[0]
    finally:
        moto.send_signal(signal.SIGCONT)
        moto.terminate()
        moto.wait(timeout=10)
