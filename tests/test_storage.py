"""Exclusive creation and ingredient leases: no two processes train the same ingredient at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_soups.config import StorageConfig
from model_soups.storage import Lease, Store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return Store(StorageConfig(root=f"file://{tmp_path}"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store(StorageConfig(root=f"s3://soup-bucket/leases-{tmp_path.name}", endpoint_url=endpoint))


def test_create_exclusive_writes_once(store):
    url = store.url("x", "once.json")
    assert store.create_exclusive(url, b"first")
    assert not store.create_exclusive(url, b"second")
    assert store.read_bytes(url) == b"first"


def test_a_held_lease_cannot_be_taken_and_is_free_after_release(store):
    url = store.url("ingredient", "lease.json")
    holder, rival = Lease(store, url, 30), Lease(store, url, 30)
    assert holder.acquire()
    assert not rival.acquire()
    holder.release()
    assert rival.acquire()
    rival.release()
    assert not store.exists(url)


def test_lease_of_a_dead_process_on_this_host_is_taken_over(store):
    url = store.url("ingredient", "lease.json")
    script = ("import sys; from model_soups.config import StorageConfig; from model_soups.storage import Lease, Store;"
              "s = Store(StorageConfig(root=sys.argv[1], endpoint_url=sys.argv[3] or None));"
              "assert Lease(s, sys.argv[2], 300).acquire()")
    subprocess.run([sys.executable, "-c", script, store.root, url, store.endpoint or ""], check=True)
    assert store.exists(url)  # the process ended without releasing: as if it had crashed
    assert Lease(store, url, 300).acquire()


def test_expired_lease_is_taken_over(store):
    url = store.url("ingredient", "lease.json")
    store.write_json(url, {"host": "another-machine", "pid": 1, "token": "t", "expires": 0})
    assert Lease(store, url, 30).acquire()
