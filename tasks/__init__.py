"""Prefect tasks, one module per stage: thin wrappers over the library, adding retries, logging and artifacts.

Result caching is off on purpose: reuse is decided by the storage root, where every ingredient and
evaluation is verified against its sha256 before it is reused. Prefect's cache could not see a corrupt or
deleted checkpoint, and it would not be shared by machines that only share the bucket.
"""

import re

from prefect.cache_policies import NONE

from model_soups.config import RunConfig

QUIET = {"cache_policy": NONE, "persist_result": False}


def artifact_key(config: RunConfig, name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{config.experiment}-{name}".lower())
