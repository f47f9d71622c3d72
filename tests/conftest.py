"""Shared fixtures: a Prefect test server, a moto S3 endpoint over HTTP, small digits configs."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

import pytest

# Before Prefect is imported anywhere: keep its database and results out of the user's home.
_PREFECT_HOME = tempfile.mkdtemp(prefix="soup-tests-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # after the test server has stopped
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = os.path.join(_PREFECT_HOME, "results")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint over HTTP on 127.0.0.1 (moto server), with a bucket and credentials in the env."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = "testing-key", "testing-secret"
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("soup-bucket")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def small_digits(root: str, experiment: str = "t", n: int = 3, **sweep_params) -> dict:
    """A digits config that runs in seconds: few ingredients, few steps, a short learned soup."""
    return {
        "experiment": experiment,
        "storage": {"root": root},
        "recipe": {"name": "digits", "options": {"pretrain_examples": 2000, "pretrain_epochs": 2, "width": 8}},
        "sweep": {"n": n, "seed": 1, "params": {"epochs": [2], "max_steps": [12], **sweep_params}},
        "soup": {"learned": {"steps": 5}},
        "execution": {"device_slots": 2, "retries": 1},
    }
