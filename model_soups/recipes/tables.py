"""Labelled text files for the text recipe: CSV, TSV (quoting off) or parquet at a path, a file:// or an s3:// URL,
with or without a header row, each split's columns named in the config."""

from __future__ import annotations

import csv
import io

import pandas as pd
from pydantic import ValidationError

from model_soups.config import StorageConfig
from model_soups.storage import StorageError, StorageUnavailable, Store, as_url
from model_soups.storage.backends import BACKENDS
from model_soups.validation import ConfigError


def read_file(location: str, split: str) -> bytes:
    """A data file's bytes, through a Store: an S3 endpoint that does not answer is waited out and retried like the
    run's own storage (its endpoint and credentials from the environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID ...)."""
    url = as_url(location)
    try:
        store = Store(StorageConfig(root=url.rsplit("/", 1)[0]))
    except ValidationError:
        raise ConfigError(f"recipe.options ({split}): cannot read {location}: {url.split('://', 1)[0]}:// is not a "
                          f"storage backend ({', '.join(BACKENDS)}); give a path, a file:// or an s3:// URL") from None
    try:
        return store.read_bytes(url)
    except StorageUnavailable:
        raise
    except StorageError as error:
        raise ConfigError(f"recipe.options ({split}): cannot read {location}: {error}") from None


def read_table(url: str, data: bytes, header: bool, split: str, columns: dict[str, str | int]) -> pd.DataFrame:
    """The file's `columns` (role -> column name, or index when there is no header), renamed to their roles."""
    if url.endswith(".parquet"):
        table = pd.read_parquet(io.BytesIO(data))
    elif url.endswith(".tsv"):
        table = pd.read_csv(io.BytesIO(data), sep="\t", quoting=csv.QUOTE_NONE, header=0 if header else None)
    else:
        table = pd.read_csv(io.BytesIO(data), header=0 if header else None)
    missing = {role: column for role, column in columns.items() if column not in table.columns}
    if missing:
        how = ("a headerless file's columns are numbered from 0" if not header else
               f"set recipe.options.text_column / label_column / text_pair_column, or recipe.options.columns.{split} "
               "for this file alone")
        raise ConfigError(f"{url}: no column {', '.join(repr(c) for c in missing.values())} (for {', '.join(missing)}); "
                          f"it has {list(table.columns)}: {how}")
    return table[list(columns.values())].set_axis(list(columns), axis=1)
