"""fsspec storage: atomic writes, JSON, safetensors checkpoints read tensor by tensor with sha256 checks.

Nothing is ever unpickled from storage: checkpoints are safetensors, parsed here from their header so that
any fsspec URL (local, S3) can be streamed one tensor at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
from aiohttp import ClientError as HttpClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable
from botocore.exceptions import HTTPClientError
from safetensors.torch import save as safetensors_bytes

from model_soups.config import StorageConfig

CHUNK = 4 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class StorageError(RuntimeError):
    """Storage cannot be reached or an object is missing."""


class CorruptCheckpoint(StorageError):
    """A checkpoint is truncated, malformed or does not match its recorded sha256."""


class StorageUnavailable(StorageError):
    """The storage endpoint could not be reached, even after bounded retries with backoff."""


# Errors that mean "the endpoint is not answering right now", as opposed to a missing or bad object.
TRANSIENT = (EndpointUnreachable, HTTPClientError, HttpClientError, ConnectionError, TimeoutError)


class Store:
    """One storage root (an fsspec URL) and the operations the pipeline needs on it."""

    def __init__(self, config: StorageConfig):
        self.config = config
        self.root = config.root.rstrip("/")
        options: dict[str, Any] = {}
        if self.root.startswith("s3://"):
            # bounded: an unreachable endpoint fails in seconds instead of retrying for minutes
            options = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}}
            endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
            if config.key and config.secret:
                options["key"] = config.key.get_secret_value()
                options["secret"] = config.secret.get_secret_value()
        self.endpoint = options.get("endpoint_url")
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **options)
        self.protocol = self.root.split("://", 1)[0]
        if self.protocol == "file":
            self.root = "file://" + self.base

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def path(self, url: str) -> str:
        if url.startswith(self.root):
            return self.base + url[len(self.root):]
        fs_protocol, _, rest = url.partition("://")
        if fs_protocol != self.protocol:
            raise StorageError(f"{url}: not under the storage root {self.root}")
        return rest if self.protocol != "file" else self.fs._strip_protocol(url)

    def unavailable(self, action: str, url: str, error: BaseException, attempts: int = 1,
                    seconds: float = 0.0) -> StorageUnavailable:
        where = f"{self.root}{f' (endpoint {self.endpoint})' if self.endpoint else ''}"
        tries = f" {attempts} times over {seconds:.0f}s" if attempts > 1 else ""
        return StorageUnavailable(
            f"storage {where} is unreachable: {action} {url} failed{tries} ({type(error).__name__}: {error}). "
            "Nothing stored is lost: run again once it is back, and finished work is reused."
        )

    def retrying(self, action: str, url: str, operation: Callable[[], Any], attempts: int | None = None) -> Any:
        """Run one storage operation; on a transient endpoint error retry with backoff (1, 2, 4... s), then give up."""
        attempts = attempts or 1 + self.config.retries
        started, attempt = time.time(), 1
        while True:
            try:
                return operation()
            except TRANSIENT as error:
                if attempt == attempts:
                    raise self.unavailable(action, url, error, attempts, time.time() - started) from None
            time.sleep(2.0 ** (attempt - 1))
            attempt += 1

    # -- plain objects -------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        return self.retrying("checking", url, lambda: self.fs.exists(self.path(url)))

    def read_bytes(self, url: str) -> bytes:
        try:
            return self.retrying("reading", url, lambda: self.fs.cat_file(self.path(url)))
        except FileNotFoundError:
            raise StorageError(f"{url}: not found") from None

    def write_bytes(self, url: str, data: bytes, attempts: int | None = None) -> None:
        """Write all or nothing: a reader never sees a half-written object."""
        path = self.path(url)
        if self.protocol == "file":
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.partial-{uuid.uuid4().hex}"
            with open(partial, "wb") as handle:
                handle.write(data)
            os.replace(partial, path)
        else:  # an S3 PUT is atomic: the object appears whole or not at all
            self.retrying("writing", url, lambda: self.fs.pipe_file(path, data), attempts)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Write only if nothing is there yet; False if the object exists (S3: a conditional PUT)."""
        path = self.path(url)
        try:
            if self.protocol == "file":
                self.fs.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "xb") as handle:
                    handle.write(data)
            else:
                self.retrying("creating", url, lambda: self.fs.pipe_file(path, data, mode="create"))
        except FileExistsError:
            return False
        return True

    def read_json(self, url: str) -> Any:
        try:
            return json.loads(self.read_bytes(url))
        except json.JSONDecodeError as error:
            raise StorageError(f"{url}: not valid JSON ({error})") from None

    def write_json(self, url: str, value: Any) -> None:
        self.write_bytes(url, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def delete(self, url: str) -> None:
        path = self.path(url)
        if self.exists(url):
            self.retrying("deleting", url, lambda: self.fs.rm(path, recursive=True))

    def copy(self, source: str, target: str) -> None:
        self.retrying("copying", source, lambda: self.fs.copy(self.path(source), self.path(target)))

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

        return self.retrying("reading", url, read)

    def check_writable(self, experiment: str) -> None:
        """Fail in seconds, before any training, if the root cannot be written."""
        probe = self.url(experiment, f".probe-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"ok", attempts=1)  # no retries: a preflight answers in seconds
            self.delete(probe)
        except Exception as error:  # noqa: BLE001 - any failure here means the root is unusable
            raise StorageError(
                f"storage root {self.root}{f' (endpoint {self.endpoint})' if self.endpoint else ''} is not writable: "
                f"{type(error).__name__}: {error}. "
                "Check the URL, that the bucket exists, the endpoint (storage.endpoint_url or AWS_ENDPOINT_URL) "
                "and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."
            ) from None

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, url: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
        self.write_bytes(url, data)
        return hashlib.sha256(data).hexdigest()

    def open_checkpoint(self, url: str, sha256: str | None = None, sequential: bool = False) -> "CheckpointReader":
        """`sequential`: the whole file will be read front to back, so read ahead in large blocks."""
        return CheckpointReader(self, url, sha256, sequential)

    def load_checkpoint(self, url: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
        with self.open_checkpoint(url, sha256, sequential=True) as reader:
            return dict(reader.tensors())


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class CheckpointReader:
    """Reads a safetensors file one tensor at a time and checks its sha256 on the way.

    Tensors read in file order are hashed as they stream past, so verification costs no extra read;
    a read out of order falls back to one extra hashing pass at `verify()`.
    """

    def __init__(self, store: Store, url: str, sha256: str | None = None, sequential: bool = False):
        self.url, self.expected_sha = url, sha256
        self.store = store
        # Many checkpoints open at once get no read-ahead cache: a buffer each would make memory grow with N.
        # One read front to back gets large blocks.
        cache = {} if store.protocol == "file" else {"cache_type": "readahead" if sequential else "none"}
        try:
            self.size = store.retrying("opening", url, lambda: store.fs.size(store.path(url)))
            self.handle = store.retrying("opening", url, lambda: store.fs.open(
                store.path(url), "rb", block_size=8 * CHUNK if sequential else CHUNK, **cache))
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {url}: not found") from None
        self.digest = hashlib.sha256()
        self.in_order, self.verified = True, False
        prefix = self._read_hashed(8)
        if len(prefix) < 8:
            raise CorruptCheckpoint(f"checkpoint {url}: truncated ({self.size} bytes), not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, self.size - 8):
            raise CorruptCheckpoint(f"checkpoint {url}: header length {header_len} exceeds the file: not a safetensors file")
        try:
            header = json.loads(self._read_hashed(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CorruptCheckpoint(f"checkpoint {url}: header is not valid JSON, not a safetensors file") from None
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.info = self._parse_header(header)
        self.position = self.data_start

    def _parse_header(self, header: dict[str, Any]) -> dict[str, TensorInfo]:
        info = {}
        data_size = self.size - self.data_start
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CorruptCheckpoint(f"checkpoint {self.url}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or begin < 0 or end > data_size:
                raise CorruptCheckpoint(
                    f"checkpoint {self.url}: tensor {name!r} claims bytes {begin}..{end} for shape {shape}, "
                    f"which is {expected} bytes in a data section of {data_size}: truncated or malformed"
                )
            info[name] = TensorInfo(dtype, shape, begin, end)
        return dict(sorted(info.items(), key=lambda item: item[1].begin))

    def _read_hashed(self, n: int) -> bytes:
        try:
            data = self.handle.read(n)
        except TRANSIENT as error:  # mid-file no retry (the read position is lost): the step fails, a re-run resumes
            raise self.store.unavailable("reading", self.url, error) from None
        if self.expected_sha is not None:  # hashing costs ~1.7 GB/s per core: only when there is a sum to check
            self.digest.update(data)
        return data

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor; read into `scratch` (uint8, large enough) when given, so that a caller that consumes
        tensors one at a time reuses one buffer instead of touching fresh memory for each."""
        try:
            info = self.info[name]
        except KeyError:
            raise CorruptCheckpoint(f"checkpoint {self.url}: has no tensor {name!r}") from None
        begin, end = self.data_start + info.begin, self.data_start + info.end
        if begin >= self.position and self.in_order:
            while self.position < begin:  # bytes between tensors still count toward the hash
                self.position += len(self._read_hashed(min(CHUNK, begin - self.position)))
        else:
            self.in_order = False
            self.handle.seek(begin)
        # read straight into the tensor's memory: no intermediate bytes object
        raw = torch.empty(end - begin, dtype=torch.uint8) if scratch is None else scratch[: end - begin]
        view = memoryview(raw.numpy())
        filled = 0
        while filled < len(view):
            try:
                n = self.handle.readinto(view[filled:])
            except TRANSIENT as error:
                raise self.store.unavailable("reading", self.url, error) from None
            if not n:
                raise CorruptCheckpoint(f"checkpoint {self.url}: truncated inside tensor {name!r}")
            filled += n
        if self.in_order:
            if self.expected_sha is not None:
                self.digest.update(view)
            self.position = end
        return raw.view(info.dtype).reshape(info.shape)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.info:
            yield name, self.tensor(name)

    def verify(self) -> None:
        """Check the sha256 against the recorded one (once; leaving the `with` block also calls this)."""
        if self.expected_sha is None or self.verified:
            return
        if self.in_order:
            self.handle.seek(self.position)
            while self._read_hashed(CHUNK):
                pass
            actual = self.digest.hexdigest()
        else:
            actual = self.store.sha256(self.url)
        if actual != self.expected_sha:
            raise CorruptCheckpoint(
                f"checkpoint {self.url}: sha256 {actual[:12]}... does not match the recorded {self.expected_sha[:12]}...; "
                "the file was changed or partly written"
            )
        self.verified = True

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.verify()
        finally:
            self.close()


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


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


class Layout:
    """Where each artifact of one experiment lives (see DESIGN.md, storage layout)."""

    def __init__(self, store: Store, experiment: str):
        self.store, self.experiment = store, experiment

    def pretrained(self, fingerprint: str) -> str:
        return self.store.url(self.experiment, "pretrained", f"{fingerprint}.safetensors")

    def checkpoint(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "model.safetensors")

    def lease(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "lease.json")

    def meta(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "meta.json")

    def has_result(self, ingredient_id: str) -> bool:
        """A result is stored for the ingredient (completed or diverged); a failed attempt is not a result."""
        try:
            return self.store.read_json(self.meta(ingredient_id)).get("status") != "failed"
        except StorageUnavailable:
            raise
        except StorageError:
            return False

    def evaluation(self, ingredient_id: str, split: str, suffix: str) -> str:
        return self.store.url(self.experiment, "evals", ingredient_id, f"{split.replace(':', '_')}.{suffix}")

    def soup(self, key: str, name: str) -> str:
        return self.store.url(self.experiment, "soups", key, name)

    def run(self, run_id: str, *parts: str) -> str:
        return self.store.url(self.experiment, "runs", run_id, *parts)
