"""Prefect tasks, one module per stage: thin wrappers over the library, adding retries, logging and artifacts.

Result caching is off on purpose: reuse is decided by the storage root, where every ingredient and
evaluation is verified against its sha256 before it is reused. Prefect's cache could not see a corrupt or
deleted checkpoint, and it would not be shared by machines that only share the bucket.
"""

import logging
import re

from prefect.cache_policies import NONE

from model_soups.config import RunConfig

QUIET = {"cache_policy": NONE, "persist_result": False}


def library_logs_reach_prefect() -> None:
    """The library logs through the standard `logging` module (`model_soups.*`: a storage outage being waited out, a
    corrupt record being replaced) and never imports Prefect. Its records go where PREFECT_LOGGING_EXTRA_LOGGERS
    would send them, to the API, so they show in the task's log in the UI, whatever that setting holds."""
    library = logging.getLogger("model_soups")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in library.handlers:
            library.addHandler(handler)
    library.setLevel(logging.INFO)


library_logs_reach_prefect()


def artifact_key(config: RunConfig, name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{config.experiment}-{name}".lower())
