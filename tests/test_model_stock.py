"""Model Stock against a plain float64 reference (pairwise cosines written out), and its bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model_soups.config import ConfigError, parse_config
from model_soups.context import make_plan
from model_soups.merge import Ingredient
from model_soups.soups import model_stock, soup_state
from model_soups.task_vectors import TaskMerge, stock_ratio, task_vector
from tests.test_merge import any_store, store  # noqa: F401 (fixtures)
from tests.test_task_vectors import F64, as64, merged, scalar_context, stored

STOCK = TaskMerge("model_stock")


def reference_stock(theta0: np.ndarray, thetas: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Model Stock written plainly in float64: the mean pairwise cosine of the deltas, t (0 where the deltas disagree
    on average, cos <= 0), then the merge."""
    deltas = [(theta - theta0).ravel() for theta in thetas]
    k = len(deltas)
    cosine = np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in itertools.combinations(deltas, 2)])
    t = k * cosine / ((k - 1) * cosine + 1) if cosine > 0 else 0.0
    return t * np.mean(thetas, axis=0) + (1 - t) * theta0, t


@pytest.mark.parametrize("k", [2, 3, 5])
def test_model_stock_is_t_times_the_mean_plus_one_minus_t_times_the_start_per_tensor(any_store, k):
    pretrained, ingredients, start, states, reference = stored(any_store, n=k)
    stock = {}
    theta0 = {n: start[n].double() for n in start}
    tau = task_vector(any_store, theta0, ingredients, STOCK, F64, reference, stock)
    soup = merged(any_store, pretrained, ingredients, STOCK, reference)
    assert sum(t > 0.3 for _, t in stock.values()) > len(stock) / 2  # most tensors' deltas agree
    for name, value in soup.items():
        if not value.is_floating_point():
            assert torch.equal(value, states[0][name])  # integer buffers: the first ingredient's
            continue
        expected, t = reference_stock(as64(start, name), [as64(s, name) for s in states])
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-6, atol=1e-7)
        assert stock[name][1] == pytest.approx(t, rel=1e-9, abs=1e-12) and 0 <= t < 1, name
        assert tau[name].dtype == F64


def test_two_fine_tunes_at_right_angles_keep_the_start_and_parallel_ones_keep_their_mean(store):
    assert stock_ratio(0.0, 2) == 0.0 and stock_ratio(1.0, 2) == 1.0 and stock_ratio(0.5, 2) == pytest.approx(2 / 3)
    assert stock_ratio(-0.3, 4) == 0.0  # deltas that disagree on average: the tensor stays at theta_0
    ctx = scalar_context(store, 1.0, [2.0, 4.0], lambda w: 0.0)  # one entry: deltas 1 and 3 are parallel, cos 1
    soup = model_stock(ctx)
    assert soup.task == STOCK and [(s.tensor, s.cosine, s.t) for s in soup.trajectory] == [("w", pytest.approx(1.0), pytest.approx(1.0))]
    assert soup_state(store, soup, ctx.pretrained, ctx.reference, torch.float64)["w"].item() == pytest.approx(3.0)


def test_model_stock_needs_no_val_and_publishes_what_it_computed(store):
    ctx = scalar_context(store, 0.0, [1.0, -1.0, 2.0], lambda w: 0.0)
    ctx.score = lambda state, n: pytest.fail("Model Stock scored a candidate on val")
    soup = model_stock(ctx)  # pairwise cosines -1, 1, -1: mean -1/3, so t = 0 and w stays at the start
    assert soup.trajectory[0].t == 0.0
    assert soup_state(store, soup, ctx.pretrained, ctx.reference, torch.float32)["w"].item() == 0.0


def test_model_stock_of_one_fine_tune_is_refused(store):
    ctx = scalar_context(store, 0.0, [1.0], lambda w: 0.0)
    with pytest.raises(ValueError, match="Model Stock needs at least 2 fine-tunes .* the soup has 1: fine-tune more"):
        model_stock(ctx)


def test_model_stock_without_the_pretrained_start_is_refused(store):
    ctx = scalar_context(store, 0.0, [1.0, 2.0], lambda w: 0.0)
    ctx.pretrained = None
    with pytest.raises(ValueError, match="needs the pretrained start theta_0: the run has none"):
        model_stock(ctx)


def test_a_fine_tune_that_did_not_move_a_tensor_others_moved_is_refused_by_name(store):
    pretrained, ingredients, start, states, reference = stored(store, n=2)
    name = next(n for n, v in start.items() if v.is_floating_point())
    url = store.url("still.safetensors")
    still = Ingredient("still", url, store.save_checkpoint(url, {**states[0], name: start[name].clone()}))
    with pytest.raises(ValueError, match=f"tensor '{name}' of ingredient still equals the pretrained start while other "
                                         "fine-tunes moved it"):
        merged(store, pretrained, ingredients + [still], STOCK, reference)


def test_a_tensor_no_fine_tune_moved_stays_at_the_start(store):
    pretrained, _, start, states, reference = stored(store, n=2)
    name = next(n for n, v in start.items() if v.is_floating_point())
    frozen = []
    for i, state in enumerate(states):
        url = store.url(f"frozen{i}.safetensors")
        frozen.append(Ingredient(f"frozen{i}", url, store.save_checkpoint(url, {**state, name: start[name].clone()})))
    soup = merged(store, pretrained, frozen, STOCK, reference)
    assert torch.equal(soup[name], start[name])


def test_a_run_that_cooks_model_stock_from_fewer_than_two_ingredients_is_refused_before_training():
    config = parse_config({"sweep": {"n": 1, "params": {"seed": [0]}}})
    with pytest.raises(ConfigError, match=r"the sweep plans 1 ingredient\(s\), but execution.min_ingredients is 2 and "
                                          r"soup method model_stock needs at least 2 \(soup.methods\)\. Give more .*, "
                                          r"or set execution.min_ingredients: 1 .* and leave model_stock out of "
                                          r"soup.methods"):
        make_plan(config)
    alone = parse_config({"sweep": {"n": 1}, "soup": {"methods": ["greedy", "uniform"]},
                          "execution": {"min_ingredients": 1}})  # one model, asked for on purpose
    assert len(make_plan(alone).specs) == 1
