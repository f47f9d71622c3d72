"""Labelled text files for the text recipe: CSV, TSV (quoting off) or parquet at any fsspec URL or path, with or
without a header row, each split's columns named in the config."""

from __future__ import annotations

import csv
import io

import fsspec
import pandas as pd

from model_soups.validation import ConfigError


def read_file(url: str, split: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, OSError) as error:
        raise ConfigError(f"recipe.options ({split}): cannot read {url}: {error}") from None


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
