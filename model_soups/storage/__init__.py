"""fsspec storage: the store (atomic writes, retries), the safetensors checkpoint reader, the lease, the layout."""

from model_soups.storage.checkpoint import CHUNK, CheckpointReader, TensorInfo
from model_soups.storage.errors import CorruptCheckpoint, StorageError, StorageUnavailable
from model_soups.storage.layout import Layout, RunFolder
from model_soups.storage.lease import Lease
from model_soups.storage.store import Store, as_url

__all__ = ["CHUNK", "CheckpointReader", "CorruptCheckpoint", "Layout", "Lease", "RunFolder", "StorageError",
           "StorageUnavailable", "Store", "TensorInfo", "as_url"]
