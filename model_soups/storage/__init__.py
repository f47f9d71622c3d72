"""fsspec storage: the store (atomic writes, retries), the safetensors checkpoint reader, the lease, the layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_soups.storage.checkpoint import CHUNK, CheckpointReader, TensorInfo
from model_soups.storage.errors import CorruptCheckpoint, StorageError, StorageUnavailable
from model_soups.storage.layout import Layout, RunFolder
from model_soups.storage.lease import Lease
from model_soups.storage.store import Store, as_url

if TYPE_CHECKING:
    from model_soups.config import StorageConfig

__all__ = ["CHUNK", "CheckpointReader", "CorruptCheckpoint", "Layout", "Lease", "RunFolder", "StorageError",
           "StorageUnavailable", "Store", "TensorInfo", "as_url", "open_storage"]


def open_storage(config: StorageConfig, experiment: str) -> tuple[Store, Layout]:
    """The storage root, and where each artifact of `experiment` lives under it."""
    store = Store(config)
    return store, Layout(store, experiment)
