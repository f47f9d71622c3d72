"""Storage roots: `StorageConfig` (the run config's `storage`), and what differs between roots by the protocol of
their URL, the one place for it. Torch-free and fsspec-free, so that parsing a config imports neither.

A backend is an fsspec protocol and what the pipeline must know of it:
- `local`: its objects are files on this machine's disk, so a write is a file renamed into place (atomic), a
  checkpoint is mapped into memory and read in place (merges sum them side by side, no copy to disk first), and a
  create is `open("xb")`; otherwise a write is one PUT (atomic on an object store), a merge streams the
  checkpoints one after the other, and a cooking run copies to disk those it cannot hold in memory;
- `shared`: every process sees the same objects (the fine-tune processes and the work pool's workers write into
  it); `memory://` is seen by one process only, so only what runs in that process can use it;
- `presigned`: a link to an object is a presigned https URL that expires, not the URL itself;
- `options(storage_config)`: the fsspec options that open it (endpoint, credentials, timeouts), and `opened(fs)`
  what to set on the file system once it is open.

A new backend is one `register(Backend(...))` for a protocol fsspec knows: here, or in a module of your own named
in SOUP_STORAGE_BACKENDS (comma-separated modules, imported by every process that reads a config: set it in the
workers' environment too). Nothing outside `storage/` names a protocol.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, JsonValue, SecretStr, field_validator, model_validator

FsspecOptions = dict[str, Any]  # an fsspec file system's keyword arguments: each implementation has its own


@dataclass(frozen=True)
class Backend:
    """One storage protocol, and what the pipeline must know of it (the module's docstring says each field)."""

    protocol: str
    local: bool = False
    shared: bool = True
    presigned: bool = False
    options: Callable[[StorageConfig], FsspecOptions] = lambda config: {}
    opened: Callable[[Any], None] = lambda fs: None


def s3_options(config: StorageConfig) -> FsspecOptions:
    # One retry layer, Store.retrying, whose backoff and message are ours: botocore and s3fs try once (`s3_opened`).
    # SigV4 everywhere, presigned links included (botocore would otherwise presign with the legacy SigV2).
    options = {"config_kwargs": {"connect_timeout": 5, "read_timeout": config.request_timeout_s,
                                 "retries": {"total_max_attempts": 1}, "signature_version": "s3v4"}}
    endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if config.key and config.secret:
        options["key"] = config.key.get_secret_value()
        options["secret"] = config.secret.get_secret_value()
    return options


def s3_opened(fs: Any) -> None:
    fs.retries = 1  # s3fs's own retry loop: one attempt (a class attribute, not a constructor option)


BACKENDS: dict[str, Backend] = {}
PLUGINS = "SOUP_STORAGE_BACKENDS"


def register(backend: Backend) -> Backend:
    BACKENDS[backend.protocol] = backend
    return backend


register(Backend("file", local=True))
register(Backend("s3", presigned=True, options=s3_options, opened=s3_opened))
register(Backend("memory", shared=False))


def backend_of(root: str) -> Backend:
    """The backend of a storage root URL; a ValueError that lists the known ones if its protocol is not one."""
    protocol = root.split("://", 1)[0]
    if protocol not in BACKENDS:
        raise ValueError(f"storage root {root!r}: protocol {protocol!r} is not one of {', '.join(BACKENDS)}")
    return BACKENDS[protocol]


class StorageConfig(BaseModel):
    """Where a run's artifacts live, and how patiently storage is waited for: `storage` in the run config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    root: str = Field(
        "file://./soup-runs",
        description="fsspec URL every artifact lives under: file://..., s3://bucket/prefix",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, ...); AWS_ENDPOINT_URL works too"
    )
    key: SecretStr | None = Field(None, description="access key id; better: AWS_ACCESS_KEY_ID")
    secret: SecretStr | None = Field(None, description="secret key; better: AWS_SECRET_ACCESS_KEY")
    outage_s: float = Field(
        120, ge=0, le=3600, description="how long a storage call waits out an endpoint that does not answer, retrying "
        "after 1, 2, 4 ... s (at most 15 s apart), each wait logged; past it the run fails, and a rerun resumes")
    request_timeout_s: float = Field(
        30, gt=0, le=600, description="how long one S3 request may wait for an answer before it counts as a failed try "
        "and is retried (an endpoint that accepts connections but has frozen)")
    link_expiry_s: int = Field(
        86400, ge=60, le=604800, description="how long the presigned S3 links in the run's Prefect artifacts stay valid"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "retries" in data:
            raise ValueError("storage.retries is now a time, not a count: write outage_s (seconds an unanswering "
                             "endpoint is waited out, default 120) under storage")
        return data

    @field_validator("root")
    @classmethod
    def _known_protocol(cls, root: str) -> str:
        if "://" not in root:
            root = "file://" + root
        backend_of(root)  # a ValueError naming the known protocols
        return root

    def revealed(self) -> dict[str, JsonValue]:
        """All fields with secrets in clear, for handing to a fine-tune process over stdin (never logged)."""
        data = self.model_dump()
        for name in ("key", "secret"):
            if data[name] is not None:
                data[name] = data[name].get_secret_value()
        return data


for _module in filter(None, (name.strip() for name in os.environ.get(PLUGINS, "").split(","))):
    try:
        importlib.import_module(_module)
    except ImportError as error:
        raise ImportError(f"{PLUGINS}: cannot import storage backend module {_module!r} ({error}); fix the module "
                          f"name or the PYTHONPATH, or unset {PLUGINS}") from None
