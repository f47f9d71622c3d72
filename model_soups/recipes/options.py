"""The built-in recipes' options: plain data, read by the config without importing torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OOD_SHIFTS = ("rotate", "noise", "thick")  # the digits recipe's distribution shifts


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    val_size: int = Field(600, ge=10, description="held out from train, used only to choose")
    test_size: int = Field(500, ge=10)
    ood: list[str] = Field(list(OOD_SHIFTS), description=f"distribution shifts, from {', '.join(OOD_SHIFTS)}")
    pretrain_examples: int = Field(20000, ge=100, description="printed digits rendered for pretraining")
    pretrain_epochs: int = Field(6, ge=1)
    head: Literal["linear-probe", "zero-shot"] = Field(
        "linear-probe", description="the start's head: refitted on handwritten train features (LP-FT), or the printed-digit one")
    norm: Literal["group", "batch"] = Field("group", description="GroupNorm averages as it is; BatchNorm needs soup.recompute_bn")
    width: int = Field(64, ge=4, description="channels of the first conv layer; wider nets average better")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="float64: the same fine-tunes and soups on every CPU; training steps take about 5 times as long")
    split_seed: int = 0


class SplitColumns(BaseModel):
    """The columns of one split's file, where they differ from text_column / label_column / text_pair_column."""

    model_config = ConfigDict(extra="forbid")
    text: str | int | None = None
    label: str | int | None = None
    text_pair: str | int | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="local folder or hub id; default: the packaged all-MiniLM-L6-v2")
    train: str | None = Field(None, description="URL of the training file (csv, tsv, parquet)")
    test: str | None = Field(None, description="URL of the in-distribution test file")
    ood: dict[str, str] = Field(default_factory=dict, description="shift name -> URL")
    header: bool = Field(True, description="CSV/TSV files start with a header row; false: name columns by index (0, 1...)")
    text_column: str | int = "text"
    text_pair_column: str | int | None = Field(None, description="second sentence for pair tasks")
    label_column: str | int = "label"
    columns: dict[str, SplitColumns] = Field(
        default_factory=dict, description="per split (train, test, ood:<name>), columns named otherwise than above")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=2, description="subsample train (before val is held out)")
    max_length: int = Field(128, ge=8, le=4096)
    pooling: Literal["mean", "cls"] = Field("mean", description="mean over real tokens (as sentence-transformers "
                                            "trained MiniLM), or the model's own [CLS] pooler and head")
    head: Literal["linear-probe", "random"] = Field("linear-probe", description="the start's head: fitted on frozen "
                                                   "train features (LP-FT), or drawn with a fixed seed")
    group_by_length: bool = Field(True, description="training batches of similar lengths, as the transformers Trainer's option")
    split_seed: int = 0
