"""A lease per ingredient, so that no two processes (on any machine) fine-tune it at once."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from model_soups.storage.errors import StorageError

if TYPE_CHECKING:
    from model_soups.storage.store import Store


class Holder(BaseModel):
    """What a lease object says: who holds it, and until when unless renewed."""

    host: str
    pid: int
    token: str
    expires: float


class Lease:
    """Who is training an ingredient right now, so that no two processes (on any machine) train it at once.

    The lease is an object created only if absent. Its holder renews it every `seconds / 3`; it is stale once
    it has not been renewed for `seconds`, or at once if its holder is a dead process on this host.
    Taking over a stale lease deletes it and creates it anew, which leaves a small window in which two takers
    can race; both would train the same seeded ingredient to the same result.
    """

    def __init__(self, store: Store, url: str, seconds: float):
        self.store, self.url, self.seconds = store, url, seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return Holder(host=socket.gethostname(), pid=os.getpid(), token=self.token,
                      expires=time.time() + self.seconds).model_dump_json().encode()

    def holder(self) -> Holder | None:
        """The holder, or None where there is no lease or it cannot be read (half written, damaged): a stale one."""
        try:
            return Holder.model_validate_json(self.store.read_bytes(self.url))
        except (StorageError, ValidationError):
            return None

    @staticmethod
    def is_stale(holder: Holder) -> bool:
        if holder.expires < time.time():
            return True
        if holder.host == socket.gethostname():
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
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
        if record is not None and record.token == self.token:
            self.store.delete(self.url)

