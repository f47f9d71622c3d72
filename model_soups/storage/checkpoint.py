"""safetensors checkpoints, parsed here from their header so that any fsspec URL (local, S3) can be
streamed one tensor at a time and its sha256 checked on the way. Nothing is ever unpickled.

Hand-written on purpose: `safetensors.safe_open` needs a local file and cannot hash what it reads, so it
would cost a download of every S3 checkpoint plus a second read to verify it.

Two readers: `CheckpointReader` streams any fsspec URL through a file handle; `MappedCheckpoint` maps a local
file into memory, so that a merge reads tensors where the page cache holds them, without a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, NamedTuple, Protocol, TypeVar

import torch
from safetensors.torch import save as safetensors_bytes

from model_soups.storage.backends import Backend
from model_soups.storage.errors import CorruptCheckpoint

CHUNK = 4 * 1024 * 1024
T = TypeVar("T")
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def checkpoint_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)


class Source(Protocol):
    """What a reader needs of the store it reads from (`Store` is one): the file system, retries, a whole-file hash."""

    backend: Backend
    fs: Any

    def path(self, url: str) -> str: ...

    def retrying(self, action: str, url: str, operation: Callable[[], T]) -> T: ...

    def sha256(self, url: str) -> str: ...


class TensorInfo(NamedTuple):  # a tuple: one is built per tensor per checkpoint opened, and cheaply
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def header_length(url: str, prefix: bytes, size: int) -> int:
    """The length of the JSON header, from a file's first 8 bytes."""
    if len(prefix) < 8:
        raise CorruptCheckpoint(f"checkpoint {url}: truncated ({size} bytes), not a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptCheckpoint(f"checkpoint {url}: header length {length} exceeds the file: not a safetensors file")
    return length


def parse_header(url: str, raw: bytes, data_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Each tensor's dtype, shape and bytes in the data section, in file order, checked against its size; and the
    metadata."""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptCheckpoint(f"checkpoint {url}: header is not valid JSON, not a safetensors file") from None
    metadata = header.pop("__metadata__", None) or {}
    info = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CorruptCheckpoint(f"checkpoint {url}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(map(int, entry["shape"]))
        begin, end = map(int, entry["data_offsets"])
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0 or end > data_size:
            raise CorruptCheckpoint(
                f"checkpoint {url}: tensor {name!r} claims bytes {begin}..{end} for shape {shape}, "
                f"which is {expected} bytes in a data section of {data_size}: truncated or malformed"
            )
        info[name] = TensorInfo(dtype, shape, begin, end)
    return dict(sorted(info.items(), key=lambda item: item[1].begin)), metadata


class OpenCheckpoint(ABC):
    """What both readers share: tensors by name in file order, the sha256 check, and the `with` block that runs it."""

    url: str
    expected_sha: str | None
    verified: bool
    info: dict[str, TensorInfo]

    @abstractmethod
    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor by name."""

    @abstractmethod
    def digest(self) -> str:
        """The sha256 of the whole file."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the file."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.info:
            yield name, self.tensor(name)

    def verify(self) -> None:
        """Check the sha256 against the recorded one (once; leaving the `with` block also calls this)."""
        if self.expected_sha is None or self.verified:
            return
        actual = self.digest()
        if actual != self.expected_sha:
            raise CorruptCheckpoint(
                f"checkpoint {self.url}: sha256 {actual[:12]}... does not match the recorded {self.expected_sha[:12]}...; "
                "the file was changed or partly written"
            )
        self.verified = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.verify()
        finally:
            self.close()


class CheckpointReader(OpenCheckpoint):
    """Reads a safetensors file one tensor at a time and checks its sha256 on the way.

    Tensors read in file order are hashed as they stream past, so verification costs no extra read;
    a read out of order falls back to one extra hashing pass at `verify()`.
    """

    def __init__(self, store: Source, url: str, sha256: str | None = None, sequential: bool = False):
        self.url, self.expected_sha = url, sha256
        self.store = store
        # Many checkpoints open at once get no read-ahead cache: a buffer each would make memory grow with N.
        # One read front to back gets large blocks.
        cache = {} if store.backend.local else {"cache_type": "readahead" if sequential else "none"}
        self._open = lambda: store.fs.open(store.path(url), "rb", block_size=8 * CHUNK if sequential else CHUNK, **cache)
        try:
            self.size = store.retrying("opening", url, lambda: store.fs.size(store.path(url)))
            self.handle = store.retrying("opening", url, self._open)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {url}: not found") from None
        self.hashed = hashlib.sha256()  # what was read in order so far
        self.in_order, self.verified = True, False
        header_len = header_length(url, self._read_hashed(8), self.size)
        self.data_start = 8 + header_len
        self.info, self.metadata = parse_header(url, self._read_hashed(header_len), self.size - self.data_start)
        self.position = self.data_start

    def _resuming(self, read: Callable[[], T]) -> T:
        """One read from where the handle stands. If the endpoint fails mid-file, the outage is waited out like any
        storage call (each wait logged, up to storage.outage_s), and the read resumes at the same byte in a fresh
        handle: what was read and hashed before stays good."""
        offset, again = self.handle.tell(), False

        def attempt() -> T:
            nonlocal again
            if again:
                self.handle.close()
                self.handle = self._open()
                self.handle.seek(offset)
            again = True
            return read()

        return self.store.retrying("reading", self.url, attempt)

    def _read_hashed(self, n: int) -> bytes:
        data = self._resuming(lambda: self.handle.read(n))
        if self.expected_sha is not None:  # hashing costs ~1.7 GB/s per core: only when there is a sum to check
            self.hashed.update(data)
        return data

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor; read into `scratch` (uint8, large enough) when given, so that a caller that consumes
        tensors one at a time reuses one buffer instead of touching fresh memory for each."""
        try:
            info = self.info[name]
        except KeyError:
            raise CorruptCheckpoint(f"checkpoint {self.url}: has no tensor {name!r}") from None
        begin, end = self.data_start + info.begin, self.data_start + info.end
        if begin >= self.position and self.in_order and self.expected_sha is None:
            self.handle.seek(begin)  # nothing to hash: skip without reading
            self.position = begin
        elif begin >= self.position and self.in_order:
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
            n = self._resuming(lambda: self.handle.readinto(view[filled:]))
            if not n:
                raise CorruptCheckpoint(f"checkpoint {self.url}: truncated inside tensor {name!r}")
            filled += n
        if self.in_order:
            if self.expected_sha is not None:
                self.hashed.update(view)
            self.position = end
        return raw.view(info.dtype).reshape(info.shape)

    def digest(self) -> str:
        """Read in order, the rest of the file is hashed on; read out of order, the whole file is hashed again."""
        if not self.in_order:
            return self.store.sha256(self.url)
        self.handle.seek(self.position)
        while self._read_hashed(CHUNK):
            pass
        return self.hashed.hexdigest()

    def close(self) -> None:
        self.handle.close()


class MappedCheckpoint(OpenCheckpoint):
    """A local safetensors file mapped read-only into memory: tensors by name, copied out (`tensor`) or as views of
    the page cache (`view`, `span`) that a merge reads in place and never writes to.

    The store writes every file by renaming a finished one into place, so a mapped file is never truncated under
    its reader. `verify()` hashes the mapped bytes, one pass at sha256's speed, when a sha256 is given to check.
    """

    def __init__(self, path: str, url: str, sha256: str | None = None):
        self.url, self.expected_sha, self.verified = url, sha256, False
        try:
            with open(path, "rb") as handle:
                self.size = os.fstat(handle.fileno()).st_size
                if self.size < 8:
                    raise CorruptCheckpoint(f"checkpoint {url}: truncated ({self.size} bytes), not a safetensors file")
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {url}: not found") from None
        length = header_length(url, self.map[:8], self.size)
        self.data_start = 8 + length
        self.info, self.metadata = parse_header(url, self.map[8:self.data_start], self.size - self.data_start)

    def span(self, first: str, last: str) -> torch.Tensor:
        """Tensors `first` to `last` (in file order, one dtype, no gap between them) as one flat read-only view."""
        begin, end = self.info[first].begin, self.info[last].end
        dtype = self.info[first].dtype
        if begin == end:  # an empty tensor: no buffer to view
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():  # read-only on purpose: torch warns that a write would fail
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=self.data_start + begin)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a read-only view of the mapped file: no copy."""
        if name not in self.info:
            raise CorruptCheckpoint(f"checkpoint {self.url}: has no tensor {name!r}")
        return self.span(name, name).reshape(self.info[name].shape)

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor in memory of its own (in `scratch`, uint8 and large enough, when given)."""
        view = self.view(name)
        if scratch is None:
            return view.clone()
        out = scratch[: view.numel() * view.element_size()].view(view.dtype).reshape(view.shape)
        return out.copy_(view)

    def digest(self) -> str:
        return hashlib.sha256(self.map).hexdigest()

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view still points into it: the mapping goes when the last view does
            pass
