"""The fine-tuning loop: deterministic on CPU for a seed, and a non-finite loss stops it as 'diverged'."""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
import torch

from model_soups.evaluate import predict
from model_soups.processes import device_slots
from model_soups.recipes.base import get_recipe


@pytest.fixture(scope="module")
def recipe_and_pretrained():
    recipe = get_recipe("digits", {"width": 8, "pretrain_examples": 1000, "pretrain_epochs": 1})
    return recipe, recipe.make_pretrained()


def test_same_seed_gives_identical_weights_on_cpu(recipe_and_pretrained):
    from model_soups.train import finetune

    recipe, pretrained = recipe_and_pretrained
    hp = recipe.Hyperparameters(lr=3e-3, epochs=1, max_steps=8, mixup=0.2, augment=1.0, label_smoothing=0.1, seed=5)
    first = finetune(recipe, pretrained, hp, log=lambda _: None)
    second = finetune(recipe, pretrained, hp, log=lambda _: None)
    other_seed = finetune(recipe, pretrained, hp.model_copy(update={"seed": 6}), log=lambda _: None)
    assert first.status == second.status == "completed" and first.steps == 8
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    assert not torch.equal(first.state["head.weight"], other_seed.state["head.weight"])


def test_non_finite_loss_stops_the_ingredient_as_diverged(recipe_and_pretrained):
    from model_soups.train import finetune

    recipe, pretrained = recipe_and_pretrained
    exploding = {k: v.clone() for k, v in pretrained.items()}
    exploding["head.weight"].fill_(3e38)  # logits overflow to inf at the first step
    result = finetune(recipe, exploding, recipe.Hyperparameters(epochs=1, max_steps=5), log=lambda _: None)
    assert result.status == "diverged" and result.state is None
    assert "loss became" in result.reason and "step 0" in result.reason


def test_cpu_slots_get_one_thread_each_and_no_gpu():
    slots = device_slots(3)
    assert [s.name for s in slots] == ["cpu:0", "cpu:1", "cpu:2"] or all(s.name.startswith("cuda:") for s in slots)
    if slots[0].name.startswith("cpu"):
        assert all(s.env["OMP_NUM_THREADS"] == "1" and s.env["CUDA_VISIBLE_DEVICES"] == "" for s in slots)


def test_printed_digit_pretraining_is_deterministic_and_reads_handwriting_zero_shot():
    recipe = get_recipe("digits", {"width": 16, "pretrain_examples": 3000, "pretrain_epochs": 2, "head": "zero-shot"})
    first, second = (hashlib.sha256(safetensors.torch.save(recipe.make_pretrained())).hexdigest() for _ in range(2))
    assert first == second
    model = recipe.build_model()
    model.load_state_dict(recipe.make_pretrained())
    val = recipe.load_split("val")
    assert (predict(model, val).argmax(1) == val.labels.numpy()).mean() > 0.3  # trained on fonts only; chance is 0.1


FINETUNE_IN_A_PROCESS = """
import sys, safetensors.torch
from model_soups.recipes.base import get_recipe
from model_soups.train import finetune
recipe = get_recipe("digits", {"width": 64, "pretrain_examples": 1000, "pretrain_epochs": 1, "dtype": sys.argv[1]})
hp = recipe.Hyperparameters(lr=1e-3, epochs=1, max_steps=15, mixup=0.2, augment=1.0, label_smoothing=0.1, seed=3)
safetensors.torch.save_file(finetune(recipe, recipe.make_pretrained(), hp, log=lambda _: None).state, sys.argv[2])
"""


def test_float64_digits_come_out_the_same_under_every_cpu_capability(tmp_path):
    """`recipe.options.dtype: float64` is what makes the demo print one table on every CPU: the start (pretraining and
    its linear probe) and a fine-tune with augmentation and mixup, under torch's plain kernels and under the best this
    CPU has, agree to 1e-9. A net drawn in float32, a loss taken in float32 or a probe left where L-BFGS stops each
    break that (1e-6 to 1e-2 apart here), and SGD grows such gaps into other fine-tunes."""
    import os
    import subprocess
    import sys

    states = []
    for capability in ("DEFAULT", None):  # None: what torch picks on this CPU (AVX2 or AVX512 on x86)
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | (
            {"ATEN_CPU_CAPABILITY": capability.lower()} if capability else {})
        out = tmp_path / f"{capability}.safetensors"
        subprocess.run([sys.executable, "-c", FINETUNE_IN_A_PROCESS, "float64", str(out)], env=env, check=True,
                       timeout=300)
        states.append(safetensors.torch.load_file(out))
    plain, best = states
    assert all(t.dtype == torch.float64 for t in plain.values() if t.is_floating_point())
    assert max((plain[k] - best[k]).abs().max().item() for k in plain) < 1e-9
