"""A lease per ingredient, so that no two processes (on any machine) fine-tune it at once."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from model_soups.storage.errors import StorageError

if TYPE_CHECKING:
    from model_soups.storage.store import Store


class Lease:
    """Who is training an ingredient right now, so that no two processes (on any machine) train it at once.

    The lease is an object created only if absent. Its holder renews it every `seconds / 3`; it is stale once
    it has not been renewed for `seconds`, or at once if its holder is a dead process on this host.
    Taking over a stale lease deletes it and creates it anew, which leaves a small window in which two takers
    can race; both would train the same seeded ingredient to the same result.
    """

    def __init__(self, store: Store, url: str, seconds: float):
        self.store, self.url, self.seconds = store, url, seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.seconds}).encode()

    def holder(self) -> dict[str, Any] | None:
        try:
            return self.store.read_json(self.url)
        except StorageError:
            return None

    def is_stale(self, record: dict[str, Any]) -> bool:
        if record.get("expires", 0) < time.time():
            return True
        if record.get("host") == socket.gethostname():
            try:
                os.kill(int(record["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
        return False

    def acquire(self) -> bool:
        if not self.store.create_exclusive(self.url, self._record()):
            record = self.holder()
            if record is not None and not self.is_stale(record):
                return False
            self.store.delete(self.url)
            if not self.store.create_exclusive(self.url, self._record()):
                return False
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            self.store.write_bytes(self.url, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        record = self.holder()
        if record is not None and record.get("token") == self.owner["token"]:
            self.store.delete(self.url)

