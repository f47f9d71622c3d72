"""Greedy soup against a plain reference loop, learned soup, ensembles from stored logits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.func import functional_call

from model_soups.config import SoupOptions, StorageConfig
from model_soups.evaluate import metrics, predict
from model_soups.merge import Ingredient
from model_soups.recipes import get_recipe
from model_soups.recipes.digits import DigitsNet
from model_soups.soups import SoupContext, ensemble_logits, greedy_ensemble, greedy_soup, learned_soup, mix, rank
from model_soups.storage import Store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(StorageConfig(root=f"file://{tmp_path}"))


def scalar_ingredients(store, values):
    out = []
    for i, value in enumerate(values):
        url = store.url(f"i{i}.safetensors")
        out.append(Ingredient(f"i{i}", url, store.save_checkpoint(url, {"w": torch.tensor([float(value)])})))
    return out


def greedy_with(store, values, score_of_mean, rule):
    """Run the library's greedy soup where a soup's val score is a function of its (scalar) weight."""
    ingredients = scalar_ingredients(store, values)
    val = {i.id: score_of_mean(float(v)) for i, v in zip(ingredients, values)}
    with store.open_checkpoint(ingredients[0].url) as reader:
        reference = reader.info
    ctx = SoupContext(store, rank(ingredients, val), val, reference, SoupOptions(rule=rule),
                      lambda state, size: score_of_mean(float(state["w"][0])), model=None, val=None)
    soup = greedy_soup(ctx)
    return [i.id for i in soup.ingredients], soup


def reference_greedy(values, score_of_mean, rule):
    """Recipe 1 of the paper, written plainly in float64 with no running sum."""
    scores = [score_of_mean(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: -scores[i])
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = float(np.mean(np.array([values[j] for j in soup + [i]], dtype=np.float64)))
        score = score_of_mean(candidate)
        if (score >= best) if rule == ">=" else (score > best):
            soup, best = soup + [i], score
    return [f"i{i}" for i in soup]


def peaked(target):
    return lambda x: -abs(x - target)


@pytest.mark.parametrize("rule, expected", [(">=", ["i0", "i1"]), (">", ["i0"])])
def test_greedy_tie_is_accepted_by_paper_rule_and_rejected_by_strict_rule(store, rule, expected):
    # i1 has the same weight as i0, so adding it leaves the val score unchanged: a tie.
    chosen, _ = greedy_with(store, [2.0, 2.0, 5.0], peaked(2.0), rule)
    assert chosen == expected


def test_greedy_adds_what_improves_the_average_and_rejects_what_hurts_it(store):
    # Alone, 3 and 1 both score -1; together they average 2, the optimum. Adding 5 then moves the average away.
    chosen, soup = greedy_with(store, [3.0, 1.0, 5.0], peaked(2.0), ">=")
    assert chosen == ["i0", "i1"] and reference_greedy([3.0, 1.0, 5.0], peaked(2.0), ">=") == ["i0", "i1"]
    assert [t["accepted"] for t in soup.trajectory] == [True, True, False]


@pytest.mark.parametrize("rule", [">=", ">"])
@pytest.mark.parametrize("case", range(25))
def test_greedy_matches_reference_loop_on_random_cases(store, rule, case):
    rng = random.Random(case)
    values = [rng.choice([0, 1, 2, 3, 4, 6, 8]) for _ in range(rng.randint(2, 7))]
    target = rng.choice([1.5, 2.0, 3.0, 4.0])
    score = lambda x: round(-abs(x - target), 3)  # coarse, so ties happen  # noqa: E731
    chosen, soup = greedy_with(store, values, score, rule)
    assert chosen == reference_greedy(values, score, rule)
    assert len(soup.trajectory) == len(values)  # the best, then exactly N-1 candidates


def test_greedy_costs_exactly_n_minus_one_evaluations(store):
    calls = []
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    ingredients = scalar_ingredients(store, values)
    val = {i.id: -abs(v - 3) for i, v in zip(ingredients, values)}
    with store.open_checkpoint(ingredients[0].url) as reader:
        ctx = SoupContext(store, rank(ingredients, val), val, reader.info, SoupOptions(),
                          lambda s, size: calls.append(1) or -abs(float(s["w"][0]) - 3), None, None)
    greedy_soup(ctx)
    assert len(calls) == len(values) - 1


def test_learned_soup_mixing_with_one_hot_weights_reproduces_an_ingredient():
    torch.manual_seed(0)
    models = [DigitsNet(width=4) for _ in range(3)]
    states = [m.state_dict() for m in models]
    stacks = {n: torch.stack([s[n].float() for s in states]) for n in states[0] if states[0][n].is_floating_point()}
    fixed = {n: v for n, v in states[0].items() if n not in stacks}
    mixed = {**mix(stacks, {n: torch.tensor([0.0, 0.0, 1.0]) for n in stacks}), **fixed}
    x = torch.randn(5, 1, 8, 8)
    models[2].eval()
    probe = DigitsNet(width=4).eval()
    assert torch.allclose(functional_call(probe, mixed, (x,)), models[2](x), atol=1e-6)


def test_learned_soup_fits_weights_that_sum_to_one_per_tensor(store):
    recipe = get_recipe("digits", {"width": 4, "pretrain_examples": 1000, "pretrain_epochs": 1})
    torch.manual_seed(0)
    states = [DigitsNet(width=4).state_dict() for _ in range(3)]
    ingredients = []
    for i, state in enumerate(states):
        url = store.url(f"m{i}.safetensors")
        ingredients.append(Ingredient(f"m{i}", url, store.save_checkpoint(url, state)))
    with store.open_checkpoint(ingredients[0].url) as reader:
        ctx = SoupContext(store, ingredients, {i.id: 0.5 for i in ingredients}, reader.info,
                          SoupOptions(learned_steps=3), None, recipe.build_model(), recipe.load_split("val"))
    soup = learned_soup(ctx)
    for name, weights in soup.weights.items():
        assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5, name
    head = soup.weights["head.weight"]
    assert head != [1 / 3] * 3  # it moved away from the uniform start


def test_ensemble_from_stored_logits_equals_direct_forward_pass_ensemble(tmp_path):
    from model_soups.evaluate import evaluate_ingredient
    from model_soups.records import IngredientRecord
    from model_soups.storage import Layout

    store = Store(StorageConfig(root=f"file://{tmp_path}"))
    layout = Layout(store, "e")
    recipe = get_recipe("digits", {"width": 4})
    torch.manual_seed(0)
    models = [DigitsNet(width=4).eval() for _ in range(3)]
    test = recipe.load_split("test")
    for i, model in enumerate(models):
        url = layout.checkpoint(f"m{i}")
        meta = IngredientRecord(id=f"m{i}", status="completed", checkpoint=url, sha256=store.save_checkpoint(url, model.state_dict()))
        evaluate_ingredient(store, layout, recipe, meta, "test", lambda _: None)
    stored = [store.read_arrays(layout.evaluation(f"m{i}", "test", "npz"))["logits"] for i in range(3)]
    with torch.no_grad():
        direct = torch.stack([torch.softmax(m(test.inputs["x"]), 1) for m in models]).double().mean(0)
    assert np.allclose(np.exp(ensemble_logits(stored)), direct.numpy(), atol=1e-6)
    assert metrics(ensemble_logits(stored), test.labels.numpy()).accuracy == pytest.approx(
        float((direct.argmax(1) == test.labels).double().mean()))
    # and the stored logits are what a forward pass gives
    assert np.allclose(stored[0], predict(models[0], test), atol=1e-6)


def test_greedy_ensemble_keeps_only_members_that_do_not_hurt_val():
    labels = np.array([0, 1, 1, 0])
    good = np.array([[2.0, 0], [0, 2], [0, 2], [2, 0]])
    bad = -good * 5
    chosen = greedy_ensemble(["a", "b", "c"], {"a": good, "b": bad, "c": good}, labels)
    assert chosen == ["a", "c"]
