"""What can go wrong with storage, and which endpoint errors are worth retrying."""

from __future__ import annotations

from aiohttp import ClientError as HttpClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable
from s3fs.core import S3_RETRYABLE_ERRORS


class StorageError(RuntimeError):
    """Storage cannot be reached or an object is missing."""


class CorruptCheckpoint(StorageError):
    """A checkpoint is truncated, malformed or does not match its recorded sha256."""


class StorageUnavailable(StorageError):
    """The storage endpoint could not be reached, even after bounded retries with backoff."""


# Errors that mean "the endpoint is not answering right now", as opposed to a missing or bad object: those s3fs
# would retry itself, and a connection that fails.
TRANSIENT = (*S3_RETRYABLE_ERRORS, EndpointUnreachable, HttpClientError, ConnectionError)
