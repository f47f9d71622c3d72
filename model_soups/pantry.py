"""A cooking run's ingredients at hand: each checkpoint read from storage and checked against its sha256 once per
cooking run, however many soups, candidates and passes use it afterwards.

Checkpoints are held in memory, in the order they are first asked for, while they fit in the bound
(`execution.cook_memory_mb`); the rest are read again when asked, from a local store's own files or from a copy
on local disk of a remote one, and hashed only the first time. Pinning what fits beats evicting the least
recently used: every method passes over the ingredients in the same order, and under that pattern an LRU cache
smaller than the set misses on every read.

A held tensor is shared by every reader: callers read it and never change it in place (`merge.weighted_sum`
copies before it sums in place).
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from model_soups.merge import Ingredient
from model_soups.storage import CheckpointReader, CorruptCheckpoint, MappedCheckpoint, Store, TensorInfo


class Held:
    """A checkpoint in memory, read like a `MappedCheckpoint`: its header, then tensors by name."""

    def __init__(self, url: str, info: Mapping[str, TensorInfo], tensors: dict[str, torch.Tensor]):
        self.url, self.info, self._tensors = url, info, tensors

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CorruptCheckpoint(f"checkpoint {self.url}: has no tensor {name!r}") from None

    view = tensor  # in memory already: the held tensor itself

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Pantry:
    """The checkpoints of one cooking run (the ingredients and the pretrained start), opened like `Store.open_checkpoint`.

    `reads` counts the reads from storage (or from the local copy) per URL: with everything held, one each."""

    def __init__(self, store: Store, checkpoints: Sequence[Ingredient], memory_mb: float = 0):
        self.store, self.limit = store, int(memory_mb * 2**20)
        self.sha256 = {c.url: c.sha256 for c in checkpoints}
        self.held: dict[str, Held] = {}
        self.used = 0  # bytes held
        self.reads: Counter[str] = Counter()
        self._checked: set[str] = set()  # read whole once, its sha256 matching
        self._over: set[str] = set()  # did not fit: read again on every open
        self._copies: dict[str, str] = {}  # a remote checkpoint's copy on local disk
        self._folder: tempfile.TemporaryDirectory | None = None
        self._disk: Store | None = None
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @contextmanager
    def open_checkpoint(self, url: str, sha256: str | None = None,
                        sequential: bool = False) -> Iterator[Held | CheckpointReader | MappedCheckpoint]:
        """A reader of `url`: from memory when held, else from storage (checked the first time). A URL that is no
        checkpoint of this run is read from storage, as `Store.open_checkpoint` reads it."""
        if url not in self.sha256:
            with self.store.open_checkpoint(url, sha256, sequential) as reader:
                yield reader
            return
        if sha256 is not None and self.sha256[url] is not None and sha256 != self.sha256[url]:
            raise CorruptCheckpoint(f"checkpoint {url}: asked for sha256 {sha256[:12]}..., the run recorded "
                                    f"{self.sha256[url][:12]}...")
        held = self._hold(url)
        if held is not None:
            yield held
            return
        store, where = self._source(url)
        self.reads[url] += 1
        with store.open_checkpoint(where, None if url in self._checked else self.sha256[url], sequential) as reader:
            yield reader
        self._checked.add(url)  # reached only when the reader closed cleanly, its sha256 checked

    def streamed(self, url: str) -> bool:
        """A checkpoint of this run is held or read from local disk; any other is read as the store reads it."""
        return url not in self.sha256 and self.store.streamed(url)

    def _hold(self, url: str) -> Held | None:
        """The checkpoint in memory, read from storage and checked now if it fits; None when it does not."""
        with self._lock:
            loading = self._loading.setdefault(url, threading.Lock())
        with loading:  # two soups asking at once read it once
            if url in self.held or url in self._over:
                return self.held.get(url)
            reader = self.store.open_checkpoint(url, self.sha256[url], sequential=True)
            try:
                size = reader.size - reader.data_start
                if not self._reserve(size):
                    self._over.add(url)
                    return None
                try:
                    self.reads[url] += 1
                    tensors = dict(reader.tensors())
                    reader.verify()
                except BaseException:
                    self._reserve(-size)
                    raise
            finally:
                reader.close()
            self._checked.add(url)
            self.held[url] = Held(url, reader.info, tensors)
            return self.held[url]

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def _source(self, url: str) -> tuple[Store, str]:
        """Where a checkpoint that is not held is read from: a local store itself, else a copy on local disk, made
        once (and checked against its sha256 as it is first read)."""
        if self.store.backend.local:
            return self.store, url
        with self._lock:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="soup-pantry-")
                self._disk = self.store.on_disk(self._folder.name)
            loading = self._loading.setdefault(url, threading.Lock())
        with loading:
            if url not in self._copies:
                copy = self._disk.url(f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors")
                self.store.download(url, self._disk.path(copy))
                self._copies[url] = copy
        return self._disk, self._copies[url]

    def summary(self) -> str:
        return (f"{len(self.held)} of {len(self.sha256)} checkpoints held in memory ({self.used / 2**20:.0f} MB of "
                f"{self.limit / 2**20:.0f}); {sum(self.reads.values())} reads of {len(self.reads)} checkpoints")

    def close(self) -> None:
        """Let go of what is held and of the local copies."""
        self.held.clear()
        self.used = 0
        if self._folder is not None:
            self._folder.cleanup()
            self._folder, self._disk, self._copies = None, None, {}

    def __enter__(self) -> Pantry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
