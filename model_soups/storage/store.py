"""One storage root (an fsspec URL: local, S3, memory; see backends.py): atomic writes, JSON, arrays, checkpoints,
retries."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
import zipfile
from typing import Any, Callable
from urllib.parse import urlsplit

import fsspec
import numpy as np
import torch

from model_soups.storage.backends import StorageConfig, backend_of
from model_soups.storage.checkpoint import CHUNK, CheckpointReader, MappedCheckpoint, checkpoint_bytes
from model_soups.storage.errors import TRANSIENT, StorageError, StorageUnavailable

logger = logging.getLogger(__name__)
MAX_WAIT_S = 15.0  # the longest wait between two tries of a storage call


def as_url(location: str) -> str:
    """A URL for a URL, a plain path or a relative path (made absolute here, so it means the same to every process)."""
    if "://" in location:
        return location
    return "file://" + os.path.abspath(os.path.expanduser(location))


class Store:
    """One storage root (an fsspec URL) and the operations the pipeline needs on it."""

    def __init__(self, config: StorageConfig):
        self.config = config
        self.root = config.root.rstrip("/")
        self.backend = backend_of(self.root)
        options = self.backend.options(config)
        self.endpoint = options.get("endpoint_url")
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **options)
        self.backend.opened(self.fs)
        self.checkpoints_read: collections.Counter[str] = collections.Counter()  # opens of each checkpoint, by URL
        self._counting = threading.Lock()
        if self.backend.local:
            self.root = f"{self.backend.protocol}://{self.base}"

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def path(self, url: str) -> str:
        if url.startswith(self.root):
            return self.base + url[len(self.root):]
        fs_protocol, _, rest = url.partition("://")
        if fs_protocol != self.backend.protocol:
            raise StorageError(f"{url}: not under the storage root {self.root}")
        return self.fs._strip_protocol(url) if self.backend.local else rest

    def where(self) -> str:
        return f"{self.root}{f' (endpoint {self.endpoint})' if self.endpoint else ''}"

    def unavailable(self, action: str, url: str, error: BaseException, attempts: int = 1,
                    seconds: float = 0.0) -> StorageUnavailable:
        tries = f" {attempts} times over {seconds:.0f}s" if attempts > 1 else ""
        return StorageUnavailable(
            f"storage {self.where()} is unreachable: {action} {url} failed{tries} ({type(error).__name__}: {error}). "
            "Nothing stored is lost: run again once it is back, and finished work is reused; storage.outage_s sets "
            "how long an outage is waited out."
        )

    def retrying(self, action: str, url: str, operation: Callable[[], Any], patient: bool = True) -> Any:
        """Run one storage operation; on a transient endpoint error, retry after 1, 2, 4 ... s (at most MAX_WAIT_S
        apart), logging each wait as a warning, until storage.outage_s has passed; then give up. Not `patient`:
        one try (a preflight answers in seconds)."""
        started, attempt = time.monotonic(), 1
        while True:
            try:
                return operation()
            except TRANSIENT as error:
                waited = time.monotonic() - started
                wait = min(2.0 ** (attempt - 1), MAX_WAIT_S)
                if not patient or waited + wait > self.config.outage_s:
                    raise self.unavailable(action, url, error, attempt, waited) from None
                logger.warning(f"storage {self.where()} does not answer: {action} {url} failed "
                               f"({type(error).__name__}); trying again in {wait:.0f}s, {waited:.0f}s of "
                               f"storage.outage_s {self.config.outage_s:.0f}s waited")
            time.sleep(wait)
            attempt += 1

    # -- plain objects -------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        return self.retrying("checking", url, lambda: self.fs.exists(self.path(url)))

    def is_file(self, url: str) -> bool:
        return self.retrying("checking", url, lambda: self.fs.isfile(self.path(url)))

    def read_bytes(self, url: str) -> bytes:
        try:
            return self.retrying("reading", url, lambda: self.fs.cat_file(self.path(url)))
        except FileNotFoundError:
            raise StorageError(f"{url}: not found") from None

    def unwritable(self, action: str, url: str, error: OSError) -> StorageUnavailable:
        """A local root that cannot take a write (disk full, read-only, over quota): the storage's fault, never an
        ingredient's, so a fine-tune process exits with the storage code and is not retried as a crash."""
        return StorageUnavailable(
            f"storage {self.root} cannot be written: {action} {url} failed ({type(error).__name__}: "
            f"{error.strerror or error}). Nothing stored is lost: free space or make the folder writable, then run "
            "again, and finished work is reused."
        )

    def write_bytes(self, url: str, data: bytes, patient: bool = True) -> None:
        """Write all or nothing: a reader never sees a half-written object, and a failed write leaves no part."""
        path = self.path(url)
        if self.backend.local:
            partial = f"{path}.partial-{uuid.uuid4().hex}"
            try:
                self.fs.makedirs(os.path.dirname(path), exist_ok=True)
                with open(partial, "wb") as handle:
                    handle.write(data)
                os.replace(partial, path)
            except OSError as error:
                with contextlib.suppress(OSError):
                    os.remove(partial)
                raise self.unwritable("writing", url, error) from None
        else:  # one PUT (S3: atomic, the object appears whole or not at all)
            self.retrying("writing", url, lambda: self.fs.pipe_file(path, data), patient)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Write only if nothing is there yet; False if the object exists (S3: a conditional PUT)."""
        path = self.path(url)
        if not self.backend.local:
            try:
                self.retrying("creating", url, lambda: self.fs.pipe_file(path, data, mode="create"))
            except FileExistsError:
                return False
            return True
        try:
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "xb")
        except FileExistsError:
            return False
        except OSError as error:
            raise self.unwritable("creating", url, error) from None
        try:
            with handle:
                handle.write(data)
        except OSError as error:  # ours, and half written: removed, so that no reader takes it for a record
            with contextlib.suppress(OSError):
                os.remove(path)
            raise self.unwritable("creating", url, error) from None
        return True

    def read_json(self, url: str) -> Any:
        try:
            return json.loads(self.read_bytes(url))
        except json.JSONDecodeError as error:
            raise StorageError(f"{url}: not valid JSON ({error})") from None

    def write_json(self, url: str, value: Any) -> None:
        self.write_bytes(url, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def write_arrays(self, url: str, **arrays: np.ndarray) -> str:
        """Store arrays as one npz; returns its sha256."""
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.write_bytes(url, buffer.getvalue())
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def read_arrays(self, url: str) -> dict[str, np.ndarray]:
        try:
            with np.load(io.BytesIO(self.read_bytes(url)), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (zipfile.BadZipFile, ValueError, EOFError) as error:
            raise StorageError(f"{url}: not a readable npz archive ({type(error).__name__}: {error}); delete it, or "
                               "run again to have it made anew") from None

    def children(self, url: str) -> list[str]:
        """The URLs of the objects and folders directly under `url`, sorted; none if it does not exist."""
        try:
            paths = self.retrying("listing", url, lambda: self.fs.ls(self.path(url), detail=False))
        except FileNotFoundError:
            return []
        prefix = url.rstrip("/") + "/"
        return sorted(prefix + path.rstrip("/").rsplit("/", 1)[-1] for path in paths)

    def delete(self, url: str) -> None:
        path = self.path(url)
        if self.exists(url):
            try:
                self.retrying("deleting", url, lambda: self.fs.rm(path, recursive=True))
            except FileNotFoundError:  # deleted meanwhile by another process
                pass
            except OSError as error:  # a read-only root, or no permission
                raise self.unwritable("deleting", url, error) from None

    def download(self, url: str, path: str) -> None:
        """Copy an object to a local file."""
        try:
            self.retrying("downloading", url, lambda: self.fs.get_file(self.path(url), path))
        except FileNotFoundError:
            raise StorageError(f"{url}: not found") from None

    def on_disk(self, folder: str) -> "Store":
        """A store rooted at a local folder, with this store's retry settings."""
        return Store(self.config.model_copy(update={"root": as_url(folder), "endpoint_url": None, "key": None, "secret": None}))

    def browser_link(self, url: str, expires_s: int) -> str:
        """A link a browser can open: on S3 a presigned https URL that expires after `expires_s` (it names the
        access key id, never the secret); elsewhere the URL itself."""
        if not self.backend.presigned:
            return url
        return self.retrying("signing", url, lambda: self.fs.url(self.path(url), expires=expires_s))

    def sha256(self, url: str, progress: Callable[[int], Any] | None = None) -> str:
        """sha256 of an object, read in chunks; `progress` is called with each chunk's size."""

        def read() -> str:
            digest = hashlib.sha256()
            with self.fs.open(self.path(url), "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
            return digest.hexdigest()

        try:
            return self.retrying("reading", url, read)  # a read cut off mid-file starts that file again
        except FileNotFoundError:
            raise StorageError(f"{url}: not found") from None

    def verify_sha256(self, url: str, recorded: str) -> None:  # a StorageError unless its bytes are as recorded
        if (found := self.sha256(url)) != recorded:
            raise StorageError(f"{url}: sha256 {found[:12]}..., recorded {recorded[:12]}... (changed or damaged)")

    def check_writable(self, experiment: str) -> None:
        """Fail in seconds, before any training, if the root cannot be written: a dead endpoint is named as such,
        before anything about credentials (botocore asks for those before it connects)."""
        probe = self.url(experiment, f".probe-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"ok", patient=False)  # a preflight answers in seconds
            self.delete(probe)
        except Exception as error:  # noqa: BLE001 - any failure here means the root is unusable
            dead = self.endpoint_error()
            if dead:
                raise StorageError(
                    f"storage root {self.root}: the endpoint {self.endpoint} does not answer ({dead}). Start it, or "
                    "fix storage.endpoint_url / AWS_ENDPOINT_URL; credentials are checked once it answers."
                ) from None
            if isinstance(error, StorageUnavailable) and self.backend.local:
                raise error from None  # it names the path, the cause (read-only, full, not a folder) and what to do
            raise StorageError(
                f"storage root {self.where()} is not writable: {type(error).__name__}: {error}. "
                "Check the URL, that the bucket exists, the endpoint (storage.endpoint_url or AWS_ENDPOINT_URL) "
                "and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."
            ) from None

    def endpoint_error(self) -> str | None:
        """Why a TCP connection to the S3 endpoint fails, or None when it connects (or there is no endpoint)."""
        if not self.endpoint:
            return None
        parts = urlsplit(self.endpoint)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname, port), timeout=5).close()
        except (OSError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, url: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        data = checkpoint_bytes(state, metadata)
        self.write_bytes(url, data)
        return hashlib.sha256(data).hexdigest()

    def open_checkpoint(self, url: str, sha256: str | None = None,
                        sequential: bool = False) -> CheckpointReader | MappedCheckpoint:
        """A local file is mapped into memory; any other URL is streamed (`sequential`: the whole file will be read
        front to back, so read ahead in large blocks)."""
        with self._counting:
            self.checkpoints_read[url] += 1
        if self.backend.local:
            return MappedCheckpoint(self.path(url), url, sha256)
        return CheckpointReader(self, url, sha256, sequential)

    def streamed(self, url: str) -> bool:
        """Whether `open_checkpoint(url)` streams the checkpoint front to back (an object store); else it is mapped."""
        return not self.backend.local

    def load_checkpoint(self, url: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
        with self.open_checkpoint(url, sha256, sequential=True) as reader:
            return dict(reader.tensors())


