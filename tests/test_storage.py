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
    lease = Lease(store, url, 300)
    assert lease.acquire()
    lease.release()  # its renewal thread would otherwise outlive the test, and the endpoint


def test_expired_lease_is_taken_over(store):
    url = store.url("ingredient", "lease.json")
    store.write_json(url, {"host": "another-machine", "pid": 1, "token": "t", "expires": 0})
    lease = Lease(store, url, 30)
    assert lease.acquire()
    lease.release()


BUILD_ONCE = """
import logging, pathlib, sys, time
from model_soups.config import StorageConfig
from model_soups.records import PretrainedRecord, reuse_or_build
from model_soups.storage import Store
logging.basicConfig(level=logging.INFO, filename=sys.argv[6])  # the waiter says here that it waits
store = Store(StorageConfig(root=sys.argv[1], endpoint_url=sys.argv[3] or None))
def build():
    with open(sys.argv[4], "a") as builds:
        builds.write("built\\n")
    log, deadline = pathlib.Path(sys.argv[6]), time.time() + 60
    while "being made by another process" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)  # the first builder finishes only once the other is waiting for it
    if sys.argv[5] == "fail":
        raise SystemExit("failed while building")
    record = PretrainedRecord(url="u", sha256="s", fingerprint=sys.argv[5])
    record.write(store, sys.argv[2])
    return record
record = reuse_or_build(store, sys.argv[2], PretrainedRecord, lambda r: None, build, "the start", lease_s=30)
print("reused" if record.reused else "built", record.fingerprint)
"""


@pytest.mark.parametrize("first", ["builds", "fails"])
def test_what_two_processes_both_need_is_built_once_unless_the_first_builder_fails(store, tmp_path, first):
    """Two runs on one root both need the pretrained start, an evaluation, a soup: one builds it under a lease, the
    other waits and reuses it; if the builder fails, the one waiting builds it itself."""
    url, builds = store.url("pretrained", "start.json"), tmp_path / "builds.txt"

    def process(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", BUILD_ONCE, store.root, url, store.endpoint or "", str(builds),
                                 name, str(tmp_path / "log.txt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    builder = process("fail" if first == "fails" else "first")
    while not builds.exists():  # the first holds the lease and is building
        assert builder.poll() is None, builder.communicate()
    waiter = process("second")
    builder_out, builder_err = builder.communicate(timeout=60)
    waiter_out, waiter_err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, waiter_err
    if first == "builds":
        assert builder_out.split() == ["built", "first"] and waiter_out.split() == ["reused", "first"]
        assert builds.read_text().count("built") == 1
    else:
        assert "failed while building" in builder_err and waiter_out.split() == ["built", "second"]
        assert builds.read_text().count("built") == 2
    assert "the start: being made by another process; waiting for its result" in (tmp_path / "log.txt").read_text()
    assert not store.exists(store.url("pretrained", "start.lease"))
