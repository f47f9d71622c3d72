"""Metrics, BatchNorm re-estimation, user recipes by dotted path, sentence pairs, evaluation threads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model_soups.config import ExecutionConfig
from model_soups.evaluate import metrics, predict
from model_soups.processes import TORCH_THREADS, orchestrator_threads, torch_threads
from model_soups.recipes import get_recipe
from model_soups.recipes.digits import Digits
from model_soups.soups import recompute_batchnorm


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


def test_a_split_is_loaded_once_per_process_for_the_same_data_and_options(monkeypatch):
    loads = []
    original = Digits.load_split
    monkeypatch.setattr(Digits, "load_split", lambda self, split: loads.append(split) or original(self, split))
    first, again = get_recipe("digits", {"width": 4, "split_seed": 7}), get_recipe("digits", {"width": 4, "split_seed": 7})
    assert first.dataset("val") is again.dataset("val")  # a new recipe object, as every task builds one
    assert loads == ["val"]
    other = get_recipe("digits", {"width": 4, "split_seed": 8}).dataset("val")  # other data: loaded anew
    assert loads == ["val", "val"] and not torch.equal(other.labels, first.dataset("val").labels)


def test_logits_are_bit_identical_at_any_torch_thread_count(tmp_path):
    """What lets the orchestrator evaluate on the cores CPU fine-tunes leave: the count changes timing, never a number."""
    (tmp_path / "s.tsv").write_text("sentence\tlabel\n" + "a fine film\t1\nso dull , so long\t0\n" * 40)
    for recipe, split in ((get_recipe("digits", {}), "ood:rotate"),
                          (get_recipe("text", {"train": str(tmp_path / "s.tsv"), "text_column": "sentence"}), "val")):
        torch.manual_seed(0)
        model, data = recipe.build_model(), recipe.dataset(split)
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            one = predict(model, data, recipe.eval_batch_size)
        assert torch.get_num_threads() == TORCH_THREADS  # torch's own count, whatever ran before
        with torch_threads(2):
            two = predict(model, data, recipe.eval_batch_size)
        assert np.array_equal(one, two), recipe.name


def test_the_orchestrator_takes_the_cores_that_cpu_fine_tunes_leave(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert orchestrator_threads(ExecutionConfig(device_slots=2)) == 6
    assert orchestrator_threads(ExecutionConfig(device_slots="auto")) == 1  # one slot per core: at least one
    assert orchestrator_threads(ExecutionConfig(device_slots=12)) == 1
    assert orchestrator_threads(ExecutionConfig(fanout="work-pool")) is None  # the pool's fine-tunes run elsewhere
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert orchestrator_threads(ExecutionConfig(device_slots="auto")) is None  # on GPUs they leave the CPU alone
