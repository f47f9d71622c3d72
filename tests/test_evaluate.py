"""Metrics, BatchNorm re-estimation, user recipes by dotted path, sentence pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_soups.evaluate import metrics, recompute_batchnorm
from model_soups.recipes.base import get_recipe
from model_soups.recipes.digits import Digits


def test_metrics_match_hand_computed_values():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = np.array([0, 1, 1, 1])
    result = metrics(logits, labels)
    assert result.accuracy == pytest.approx(0.75)
    assert result.nll == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))
    # four bins with one example each: |acc - conf| averaged with weight 1/4
    assert result.ece == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)


def test_batchnorm_statistics_are_re_estimated_on_the_given_data():
    recipe = get_recipe("digits", {"width": 4, "norm": "batch"})
    model = recipe.build_model()
    train = recipe.load_split("train")
    first_norm = model.backbone[1]
    first_norm.running_mean.fill_(123.0)
    assert recompute_batchnorm(model, train, batch_size=len(train))
    with torch.no_grad():
        activations = model.backbone[0](train.inputs["x"])
    assert torch.allclose(first_norm.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not model.training


def test_a_user_recipe_is_found_by_dotted_path():
    recipe = get_recipe("model_soups.recipes.digits:Digits", {"width": 4})
    assert isinstance(recipe, Digits)
    with pytest.raises(Exception, match="cannot import"):
        get_recipe("no_such_package.mod:Recipe")


def test_text_recipe_encodes_sentence_pairs(tmp_path):
    (tmp_path / "pairs.csv").write_text("premise,hypothesis,label\n" + "it rains,it is wet,yes\nit is sunny,it snows,no\n" * 5)
    recipe = get_recipe("text", {"train": str(tmp_path / "pairs.csv"), "text_column": "premise",
                                 "text_pair_column": "hypothesis", "val_fraction": 0.2})
    train = recipe.load_split("train")
    assert recipe.label_values == ["no", "yes"] and len(train) == 8
    sep = recipe._tokenizer.sep_token_id
    assert all((row == sep).sum() == 2 for row in train.inputs["input_ids"])  # [CLS] a [SEP] b [SEP]


def test_a_split_is_loaded_once_per_recipe_the_one_a_runs_context_shares(monkeypatch):
    loads = []
    original = Digits.load_split
    monkeypatch.setattr(Digits, "load_split", lambda self, split: loads.append(split) or original(self, split))
    recipe = get_recipe("digits", {"width": 4, "split_seed": 7})
    assert recipe.dataset("val") is recipe.dataset("val")  # every evaluation and soup of a run: one load
    assert loads == ["val"]
    other = get_recipe("digits", {"width": 4, "split_seed": 8}).dataset("val")  # other data: loaded anew
    assert loads == ["val", "val"] and not torch.equal(other.labels, recipe.dataset("val").labels)
