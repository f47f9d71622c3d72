"""The temporary Prefect server of one `soup run` that names no PREFECT_API_URL, and the watchdog that stops it if
that process dies without stopping it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

SERVER_MARK = "SOUP_TEMPORARY_SERVER"


def temporary_server(stack: contextlib.ExitStack, checkout: Path) -> str:
    """Prefect's own temporary server, the one a flow starts when no PREFECT_API_URL is set, started here so that a
    watchdog process can stop it if this process dies without stopping it (SIGKILL, the OOM killer): it would be
    left running, 250 MB, with no parent. The watchdog starts first and knows the server by a mark in its
    environment, so there is no moment when the server runs unwatched. Returns its API URL."""
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer

    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[SERVER_MARK] = mark  # the server inherits it
    watchdog = subprocess.Popen(  # its stdin ends when this process ends, however it ends
        [sys.executable, "-c", f"from flows.server import stop_when_orphaned; stop_when_orphaned({mark!r})"],
        stdin=subprocess.PIPE, cwd=checkout, start_new_session=True)
    stack.callback(watchdog.stdin.close)
    server = SubprocessASGIServer()
    stack.callback(server.stop)
    server.start()
    stack.callback(lambda: APILogHandler().flush())  # the run's last log lines reach the server before it stops
    return server.api_url


def stop_when_orphaned(mark: str) -> None:
    """The watchdog: wait for the `soup` process to end, then stop the temporary server that carries `mark`, if it
    still runs (a `soup` that ends normally has stopped it already)."""
    sys.stdin.buffer.read()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        servers = marked_servers(mark)
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while servers and marked_servers(mark) and time.monotonic() < deadline:
            time.sleep(0.1)


def marked_servers(mark: str) -> list[int]:
    """The pids of Prefect server processes whose environment holds SERVER_MARK=mark."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and b"prefect.server.api.server:create_app" in (entry / "cmdline").read_bytes()
                    and f"{SERVER_MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
