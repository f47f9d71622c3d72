"""fsspec storage: the store (atomic writes, retries), the safetensors checkpoint reader, the lease, the layout, and
the backends (what differs between protocols).

Names are imported on first use, so that `storage.backends` (torch-free) can be read by the config without
importing torch or fsspec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_soups.storage.backends import StorageConfig
    from model_soups.storage.checkpoint import CHUNK, CheckpointReader, MappedCheckpoint, TensorInfo
    from model_soups.storage.errors import CorruptCheckpoint, StorageError, StorageUnavailable
    from model_soups.storage.layout import Layout, RunFolder
    from model_soups.storage.lease import Lease
    from model_soups.storage.store import Store, as_url

WHERE = {"CHUNK": "checkpoint", "CheckpointReader": "checkpoint", "MappedCheckpoint": "checkpoint", "TensorInfo": "checkpoint",
         "CorruptCheckpoint": "errors", "StorageError": "errors", "StorageUnavailable": "errors",
         "Layout": "layout", "RunFolder": "layout", "Lease": "lease", "Store": "store", "as_url": "store"}
__all__ = [*WHERE, "open_storage"]


def __getattr__(name: str):
    if name not in WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{WHERE[name]}"), name)


def open_storage(config: StorageConfig, experiment: str) -> tuple[Store, Layout]:
    """The storage root, and where each artifact of `experiment` lives under it."""
    from model_soups.storage.layout import Layout
    from model_soups.storage.store import Store

    store = Store(config)
    return store, Layout(store, experiment)
