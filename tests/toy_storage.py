"""A toy storage backend, defined outside the package as a user's own would be: `toy:///path` is a local folder
seen through fsspec's generic paths, as an object store is (writes are one `pipe_file`, a create checks then
writes, a merge copies its ingredients to disk first, checkpoints are read with fsspec's caches). Every process
of a run imports it through SOUP_STORAGE_BACKENDS=tests.toy_storage."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model_soups.storage.backends import Backend, register


class ToyFileSystem(LocalFileSystem):
    protocol = ("toy",)

    def __init__(self, **options):
        super().__init__(auto_mkdir=True, **options)  # an object store has no folders to make first

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("toy://"))


fsspec.register_implementation("toy", ToyFileSystem, clobber=True)
register(Backend("toy"))
