"""WiSE-FT, task arithmetic, TIES and DARE against plain float64 references, their choice on val, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_soups.config import ConfigError, parse_config
from model_soups.merge import CheckpointMismatch, Ingredient, NonFiniteCheckpoint
from model_soups.records import SearchStep
from model_soups.methods import TaskArithmeticOptions, TiesOptions, WiseFTBestOptions, WiseFTOptions
from model_soups.soups import SoupContext, search, soup_state, task_arithmetic, ties, wiseft_best, wiseft_soup
from model_soups.storage import CorruptCheckpoint
from model_soups.task_vectors import TaskMerge, apply, dare_keep, start, task_vector
from tests.test_merge import any_store, perturbed_states, save_all, store  # noqa: F401 (fixtures)

F64 = torch.float64


def stored(store, n=3, dtype=torch.float32):
    """The pretrained start and n fine-tunes of it, stored; and their states."""
    states = perturbed_states(n + 1, dtype)
    ingredients = save_all(store, states)
    with store.open_checkpoint(ingredients[0].url) as reader:
        reference = reader.info
    return ingredients[0], ingredients[1:], states[0], states[1:], reference


def merged(store, pretrained, ingredients, merge, reference, accumulate=F64):
    theta0 = start(store, pretrained, accumulate, reference)
    return apply(theta0, task_vector(store, theta0, ingredients, merge, accumulate, reference), merge.scale, reference)


def reference_ties(theta0: np.ndarray, thetas: list[np.ndarray], top_k: float | None, scale: float,
                   masks: list[np.ndarray] | None = None, drop: float = 0.0) -> np.ndarray:
    """TIES-merging written plainly, entry by entry, in float64."""
    deltas = []
    for i, theta in enumerate(thetas):
        delta = (theta - theta0).ravel().copy()
        if masks is not None:
            delta = np.where(masks[i].ravel(), delta / (1 - drop), 0.0)
        if top_k is not None:
            keep = max(1, round(delta.size * top_k / 100))
            threshold = np.sort(np.abs(delta))[-keep]
            delta[np.abs(delta) < threshold] = 0.0
        deltas.append(delta)
    out = np.zeros_like(deltas[0])
    for j in range(out.size):
        sign = np.sign(sum(d[j] for d in deltas))
        agreeing = [d[j] for d in deltas if np.sign(d[j]) == sign and d[j] != 0]
        out[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return theta0 + scale * out.reshape(theta0.shape)


def as64(state, name):
    return state[name].double().numpy()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wiseft_interpolates_between_the_start_and_the_mean_of_the_ingredients(any_store, alpha):
    pretrained, ingredients, start, states, reference = stored(any_store)
    soup = merged(any_store, pretrained, ingredients, TaskMerge("mean", alpha), reference)
    for name, value in soup.items():
        if not value.is_floating_point():
            assert torch.equal(value, states[0][name])  # integer buffers: the first ingredient's
            continue
        expected = (1 - alpha) * as64(start, name) + alpha * np.mean([as64(s, name) for s in states], axis=0)
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    if alpha == 0.0:  # exactly the pretrained start
        assert all(torch.equal(soup[n], start[n]) for n in soup if soup[n].is_floating_point())


def test_task_arithmetic_adds_lambda_times_the_sum_of_the_deltas(store):
    pretrained, ingredients, start, states, reference = stored(store, n=4)
    soup = merged(store, pretrained, ingredients, TaskMerge("sum", 0.3), reference)
    for name in (n for n in soup if soup[n].is_floating_point()):
        expected = as64(start, name) + 0.3 * sum(as64(s, name) - as64(start, name) for s in states)
        np.testing.assert_allclose(soup[name].double().numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_k", [10.0, 20.0, 100.0])
def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(store, top_k):
    pretrained, ingredients, start, states, reference = stored(store, n=4)
    soup = merged(store, pretrained, ingredients, TaskMerge("ties", 1.3, top_k=top_k), reference)
    for name in (n for n in soup if soup[n].is_floating_point()):
        expected = reference_ties(as64(start, name), [as64(s, name) for s in states], top_k, 1.3)
        np.testing.assert_allclose(soup[name].double().numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("combine", ["sum", "ties"])
def test_dare_drops_with_its_seeded_masks_and_rescales(store, combine):
    pretrained, ingredients, start, states, reference = stored(store, n=3)
    merge = TaskMerge(combine, 0.7, drop=0.6, seed=3)
    soup = merged(store, pretrained, ingredients, merge, reference)
    for name in (n for n in soup if soup[n].is_floating_point()):
        shape = tuple(start[name].shape)
        masks = [dare_keep(shape, 0.6, 3, i.id, name).numpy() for i in ingredients]
        thetas = [as64(s, name) for s in states]
        if combine == "sum":
            expected = as64(start, name) + 0.7 * sum(np.where(m, (t - as64(start, name)) / 0.4, 0.0) for m, t in zip(masks, thetas))
        else:
            expected = reference_ties(as64(start, name), thetas, None, 0.7, masks, drop=0.6)
        np.testing.assert_allclose(soup[name].double().numpy(), expected, rtol=1e-6, atol=1e-7)


def test_dare_masks_keep_one_minus_p_are_seeded_and_differ_by_ingredient_and_tensor():
    keep = dare_keep((400, 500), 0.9, 0, "a", "w")
    assert abs(keep.double().mean().item() - 0.1) < 0.005
    assert torch.equal(keep, dare_keep((400, 500), 0.9, 0, "a", "w"))
    for other in (dare_keep((400, 500), 0.9, 1, "a", "w"), dare_keep((400, 500), 0.9, 0, "b", "w"),
                  dare_keep((400, 500), 0.9, 0, "a", "v")):
        assert not torch.equal(keep, other)
    assert dare_keep((1000,), 0.0, 0, "a", "w").all()


def test_dare_with_p_zero_is_task_arithmetic(store):
    pretrained, ingredients, _, _, reference = stored(store)
    plain = merged(store, pretrained, ingredients, TaskMerge("sum", 0.4), reference)
    dropped = merged(store, pretrained, ingredients, TaskMerge("sum", 0.4, drop=0.0), reference)
    assert all(torch.equal(plain[n], dropped[n]) for n in plain)


def test_float16_checkpoints_are_merged_in_the_accumulation_dtype_and_written_back_in_float16(store):
    pretrained, ingredients, start, states, reference = stored(store, dtype=torch.float16)
    soup = merged(store, pretrained, ingredients, TaskMerge("ties", 1.0, top_k=50.0), reference, accumulate=torch.float32)
    name = next(n for n in soup if soup[n].is_floating_point())
    assert soup[name].dtype == torch.float16
    expected = reference_ties(as64(start, name), [as64(s, name) for s in states], 50.0, 1.0)
    np.testing.assert_allclose(soup[name].double().numpy(), expected, rtol=2e-3, atol=2e-3)


def scalar_context(store, start: float, values: list[float], score_of_weight) -> SoupContext:
    """A context whose soups are one scalar weight, scored by a function of it."""
    pretrained = Ingredient("start", store.url("start.safetensors"))
    pretrained = Ingredient("start", pretrained.url, store.save_checkpoint(pretrained.url, {"w": torch.tensor([start])}))
    ingredients = []
    for i, value in enumerate(values):
        url = store.url(f"i{i}.safetensors")
        ingredients.append(Ingredient(f"i{i}", url, store.save_checkpoint(url, {"w": torch.tensor([value])})))
    with store.open_checkpoint(pretrained.url) as reader:
        reference = reader.info
    return SoupContext(store, ingredients, {i.id: score_of_weight(v) for i, v in zip(ingredients, values)}, reference,
                       torch.float32, ">=", lambda state, n: score_of_weight(float(state["w"][0])),
                       model=None, val=None, pretrained=pretrained, base=ingredients[:2])


def test_wiseft_chooses_alpha_on_val_and_publishes_exactly_what_it_scored(store):
    # start 0, the soup it builds on (i0, i1) averages 3: val peaks at weight 1.8, alpha = 0.6
    ctx = scalar_context(store, 0.0, [2.0, 4.0, 9.0], lambda w: -abs(w - 1.8))
    soup = wiseft_soup(ctx, WiseFTOptions())
    assert soup.task == TaskMerge("mean", 0.6) and [i.id for i in soup.ingredients] == ["i0", "i1"]
    assert len(soup.trajectory) == 11 and [t.scale for t in soup.trajectory if t.chosen] == [0.6]
    published = soup_state(store, soup, ctx.pretrained, ctx.reference, torch.float32)
    assert ctx.score(published, 3) == max(t.soup_val for t in soup.trajectory)


def test_wiseft_best_and_fixed_values(store):
    ctx = scalar_context(store, 0.0, [2.0, 4.0], lambda w: -abs(w - 1.0))
    soup = wiseft_best(ctx, WiseFTBestOptions(alpha=0.25))
    assert soup.task == TaskMerge("mean", 0.25) and [i.id for i in soup.ingredients] == ["i0"]
    assert soup.trajectory == [SearchStep(combine="mean", scale=0.25, soup_val=-0.5, chosen=True)]


def test_task_arithmetic_and_ties_choose_lambda_and_k_on_val(store):
    ctx = scalar_context(store, 1.0, [2.0, 3.0, 5.0], lambda w: -abs(w - 2.4))  # sum of deltas 7: lambda 0.2 gives 2.4
    assert task_arithmetic(ctx, TaskArithmeticOptions()).task == TaskMerge("sum", 0.2)
    # one entry per tensor: every k keeps it, so TIES is the mean of the deltas (7/3), and lambda 0.5 gives 2.17 (0.8: 2.87)
    soup = ties(ctx, TiesOptions())
    assert soup.task == TaskMerge("ties", 0.5, top_k=10.0) and len(soup.trajectory) == 18


def test_ties_candidates_that_differ_only_in_lambda_share_one_pass_over_the_checkpoints(store, monkeypatch):
    ctx = scalar_context(store, 1.0, [2.0, 3.0], lambda w: -abs(w - 2.2))
    passes = []
    monkeypatch.setattr("model_soups.task_vectors.open_all", lambda *args, **kw: passes.append(1) or original(*args, **kw))
    from model_soups.merge import open_all as original
    search(ctx, "ties", ctx.ranked, [TaskMerge("ties", x, top_k=k) for k in (10.0, 50.0) for x in (0.5, 1.0, 2.0)])
    assert len(passes) == 2  # the ingredients, once per k (the pretrained start is read once, by `start`)


@pytest.mark.parametrize("section, value, expected", [
    ("task_arithmetic", {"scale": 0}, "soup.task_arithmetic.scale.0: Input should be greater than 0"),
    ("task_arithmetic", {"scale": [0.1, 11]}, "soup.task_arithmetic.scale.1: Input should be less than or equal to 10"),
    ("ties", {"top_k": 0}, "soup.ties.top_k.0: Input should be greater than 0"),
    ("ties", {"top_k": [20, 120]}, "soup.ties.top_k.1: Input should be less than or equal to 100"),
    ("ties", {"scale": []}, "soup.ties.scale: empty: give one value (fixed) or several (chosen on val)"),
    ("dare", {"drop": 1.0}, "soup.dare.drop.0: Input should be less than 1"),
    ("wiseft_best", {"alpha": 1.5}, "soup.wiseft_best.alpha.0: Input should be less than or equal to 1"),
    ("wiseft", {"on": "wiseft_best"}, None),
    ("dare_ties", {"p": 0.5}, "soup.dare_ties.p: unknown field"),
])
def test_out_of_range_options_are_refused_with_their_path(section, value, expected):
    if expected is None:  # WiSE-FT may build on any soup that builds on nothing
        assert parse_config({"soup": {section: value}}).soup.wiseft.on == "wiseft_best"
        return
    with pytest.raises(ConfigError) as error:
        parse_config({"soup": {section: value}})
    assert expected in str(error.value)


def test_wiseft_of_a_soup_that_is_not_cooked_is_refused():
    with pytest.raises(ConfigError, match="the greedy soup is not cooked; add 'greedy' to soup.methods"):
        parse_config({"soup": {"methods": ["uniform", "wiseft"], "final": "uniform"}})
    with pytest.raises(ConfigError, match="'wiseft' is not a soup it can build on"):
        parse_config({"soup": {"wiseft": {"on": "wiseft"}}})


def test_a_merge_without_the_pretrained_start_is_refused(store):
    pretrained, ingredients, _, _, reference = stored(store)
    with pytest.raises(ValueError, match="needs the pretrained start theta_0: the run has none"):
        start(store, None, F64, reference)
    gone = Ingredient("pretrained", store.url("gone.safetensors"))
    with pytest.raises(CorruptCheckpoint, match="the pretrained start, which a task-vector merge subtracts, is unusable.*not found"):
        start(store, gone, F64, reference)


def test_a_checkpoint_of_another_model_or_with_nan_is_refused_by_name(store):
    pretrained, ingredients, _, states, reference = stored(store)
    url = store.url("other.safetensors")
    other = Ingredient("other", url, store.save_checkpoint(url, {k: v for k, v in states[0].items() if not k.startswith("head.")}))
    with pytest.raises(CheckpointMismatch, match="other.safetensors: key .* is missing"):
        task_vector(store, start(store, pretrained, F64, reference), ingredients + [other], TaskMerge("sum"), F64, reference)
    url = store.url("nan.safetensors")
    poisoned = {k: v.clone() for k, v in states[0].items()}
    name = next(k for k, v in poisoned.items() if v.is_floating_point())
    poisoned[name].view(-1)[0] = float("nan")
    nan = Ingredient("nan", url, store.save_checkpoint(url, poisoned))
    with pytest.raises(NonFiniteCheckpoint, match=f"nan.safetensors: tensor '{name}' holds NaN"):
        task_vector(store, start(store, pretrained, F64, reference), [nan], TaskMerge("ties", top_k=20.0), F64, reference)
