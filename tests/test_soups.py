"""Greedy soup against a plain reference loop, learned soup, ensembles from stored logits."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.func import functional_call

from model_soups.config import StorageConfig
from model_soups.evaluate import metrics, predict
from model_soups.merge import Ingredient, weighted_average
from model_soups.methods import LearnedOptions
from model_soups.learned import by_length
from model_soups.recipes.base import SplitData, get_recipe
from model_soups.recipes.digits import DigitsNet
from model_soups.ensembles import ensemble_logits, greedy_ensemble
from model_soups.soups import SoupContext, accumulation, greedy_soup, learned_soup, rank
from model_soups.storage import Store, TensorInfo
from tests.test_merge import any_store  # noqa: F401 (fixture)


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
    ctx = SoupContext(store, rank(ingredients, val), val, reference, torch.float32, rule,
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
    assert [t.accepted for t in soup.trajectory] == [True, True, False]


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
        ctx = SoupContext(store, rank(ingredients, val), val, reader.info, torch.float32, ">=",
                          lambda s, size: calls.append(1) or -abs(float(s["w"][0]) - 3), None, None)
    greedy_soup(ctx)
    assert len(calls) == len(values) - 1


def learned_setup(store, n, norm="group", steps=3, **learned):
    """n fine-tune-like digits nets (a common start, moved apart) on `store`, and the learned soup's context."""
    recipe = get_recipe("digits", {"width": 4, "norm": norm, "pretrain_examples": 1000, "pretrain_epochs": 1})
    torch.manual_seed(0)
    start = DigitsNet(width=4, norm=norm).state_dict()
    ingredients = []
    for i in range(n):
        state = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in start.items()}
        url = store.url(f"m{i}.safetensors")
        ingredients.append(Ingredient(f"m{i}", url, store.save_checkpoint(url, state)))
    with store.open_checkpoint(ingredients[0].url) as reader:
        reference = reader.info
    model = recipe.build_model()
    return SoupContext(store, ingredients, {i.id: 0.5 for i in ingredients}, reference, torch.float32, ">=", None, model,
                       recipe.load_split("val"), eval_batch_size=64), recipe, LearnedOptions(steps=steps, **learned)


def stacked_learned_weights(ctx, steps, granularity="per-layer"):
    """The learned soup as it was, in float64: every ingredient stacked in memory, the mix differentiated through
    by autograd, torch's Adam."""
    loaded = [ctx.store.load_checkpoint(i.url) for i in ctx.ranked]
    stacks = {k: torch.stack([s[k].double() for s in loaded]) for k in loaded[0] if loaded[0][k].is_floating_point()}
    fixed = {k: v for k, v in loaded[0].items() if k not in stacks}
    rows = {k: i if granularity == "per-layer" else 0 for i, k in enumerate(stacks)}
    alpha = torch.zeros(max(rows.values()) + 1, len(loaded), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=0.05)
    model = ctx.model.double().eval()
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randperm(len(ctx.val), generator=generator)[: ctx.eval_batch_size]
        w = torch.softmax(alpha, dim=1)
        state = {k: torch.tensordot(w[rows[k]] if k in parameters else w[rows[k]].detach(), stack, dims=1)
                 for k, stack in stacks.items()} | fixed
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in ctx.val.batch(index).items()}
        loss = torch.nn.functional.cross_entropy(functional_call(model, state, args=(), kwargs=inputs), ctx.val.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.float()
    w = torch.softmax(alpha.detach(), dim=1)
    return {k: w[rows[k]].tolist() for k in stacks}


@pytest.mark.parametrize("granularity", ["per-layer", "global"])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_learned_soup_with_every_ingredient_per_step_is_the_full_gradient_of_the_stacked_soup(store, granularity, norm):
    ctx, _, options = learned_setup(store, 3, norm=norm, steps=6, granularity=granularity, models_per_step=3)
    soup = learned_soup(ctx, options)
    expected = stacked_learned_weights(ctx, 6, granularity)
    for name, weights in expected.items():
        assert soup.weights[name] == pytest.approx(weights, abs=2e-5), name
        assert weights != pytest.approx([1 / 3] * 3, abs=1e-3) or "running" in name or "num_batches" in name, name
    assert soup.weights["head.weight"] != pytest.approx([1 / 3] * 3, abs=1e-3)  # it moved away from the uniform start


class MeanOfTokens(torch.nn.Module):
    """A sequence classifier in miniature: embeddings, their mean over real tokens, a hidden layer and a head."""

    def __init__(self):
        super().__init__()
        self.embed, self.hidden, self.head = torch.nn.Embedding(30, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head(torch.tanh(self.hidden((self.embed(input_ids) * mask).sum(1) / mask.sum(1))))


def test_learned_soup_on_sequences_runs_in_parts_by_length_and_is_the_full_gradient_of_the_stacked_soup(store):
    """A batch of sequences of lengths 1 to 24 goes through forward and backward in parts of similar length, each
    padded to its own longest; the gradients of the parts add up to the whole batch's. A batch of 30 makes parts of
    8, 8, 7 and 7, so each part's mean loss must count by its size."""
    torch.manual_seed(0)
    lengths = torch.randint(1, 25, (200,))
    mask = (torch.arange(24) < lengths[:, None]).long()
    val = SplitData({"input_ids": torch.randint(1, 30, (200, 24)) * mask, "attention_mask": mask},
                    torch.randint(0, 2, (200,)), lengths=lengths)
    index = torch.randperm(200)[:30]
    parts = by_length(val, index)
    assert len(parts) > 1 and sorted(torch.cat(parts).tolist()) == sorted(index.tolist())
    assert [int(val.lengths[p].max()) for p in parts] == sorted(int(val.lengths[p].max()) for p in parts)
    assert sum(val.batch(p)["input_ids"].numel() for p in parts) < 0.8 * val.batch(index)["input_ids"].numel()
    assert by_length(SplitData(val.inputs, val.labels), index) == [index]  # no lengths: the batch as drawn
    assert [len(p) for p in by_length(val, index[:2])] == [1, 1]  # fewer examples than parts: no empty part

    start = MeanOfTokens().state_dict()
    ingredients = []
    for i in range(3):
        state = {k: v + 0.5 * torch.randn_like(v) for k, v in start.items()}
        url = store.url(f"s{i}.safetensors")
        ingredients.append(Ingredient(f"s{i}", url, store.save_checkpoint(url, state)))
    with store.open_checkpoint(ingredients[0].url) as reader:
        ctx = SoupContext(store, ingredients, {i.id: 0.5 for i in ingredients}, reader.info, torch.float32, ">=", None,
                          MeanOfTokens(), val, eval_batch_size=30)
    soup = learned_soup(ctx, LearnedOptions(steps=6, models_per_step=3))
    expected = stacked_learned_weights(ctx, 6)
    for name, weights in expected.items():
        assert soup.weights[name] == pytest.approx(weights, abs=2e-5), name
    assert soup.weights["head.weight"] != pytest.approx([1 / 3] * 3, abs=1e-3)  # it moved away from the uniform start


def test_learned_soup_on_a_batch_of_models_keeps_its_mix_equal_to_the_weights_it_returns(any_store):
    """Two of five ingredients per step: the mix updated in place is the weighted average of the weights returned,
    the weights sum to one per tensor, and every ingredient was drawn at some step."""
    ctx, recipe, options = learned_setup(any_store, 5, norm="batch", steps=8, models_per_step=2)
    soup = learned_soup(ctx, options)
    published = weighted_average(any_store, ctx.ranked, soup.weights, torch.float64, ctx.reference)
    for name, value in ctx.model.state_dict().items():
        assert torch.allclose(value.double(), published[name].double(), atol=1e-5), name
    for name, weights in soup.weights.items():
        assert len(weights) == 5 and abs(sum(weights) - 1) < 1e-9, name
    head = soup.weights["head.weight"]
    assert all(w != pytest.approx(0.2, abs=1e-4) for w in head)  # each was drawn at least once and moved


def test_learned_soup_of_zero_steps_is_the_uniform_soup(store):
    ctx, _, options = learned_setup(store, 3, steps=0)
    soup = learned_soup(ctx, options)
    assert all(w == pytest.approx([1 / 3] * 3) for name, w in soup.weights.items() if name != "num_batches_tracked")


def test_learned_soup_reads_only_the_drawn_ingredients_at_each_step(store):
    """Nothing is held across steps: the uniform start reads every ingredient once, then each step opens its
    models_per_step ingredients twice (to project the gradient, then to update the mix), whatever N is."""
    ctx, _, options = learned_setup(store, 6, steps=4, models_per_step=2)
    opened, open_checkpoint = [], store.open_checkpoint
    store.open_checkpoint = lambda url, *args, **kwargs: opened.append(url) or open_checkpoint(url, *args, **kwargs)
    learned_soup(ctx, options)
    assert opened[:6] == [i.url for i in ctx.ranked]
    steps = [opened[6 + 4 * s: 10 + 4 * s] for s in range(4)]
    assert len(opened) == 6 + 4 * 4
    assert all(step[:2] == step[2:] and len(set(step[:2])) == 2 for step in steps)


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


def test_soup_search_is_part_of_the_key_of_the_soups_that_search_only():
    from types import SimpleNamespace

    from model_soups.config import SoupOptions
    from model_soups.cooking import soup_key

    pretrained = SimpleNamespace(sha256="0" * 64)
    metas = [SimpleNamespace(id=f"i{k}", sha256=f"{k}" * 64) for k in range(3)]
    val = {m.id: 0.5 for m in metas}
    grid, fine = SoupOptions(search="grid"), SoupOptions(search="coarse-to-fine")
    for method in ("uniform", "greedy", "learned", "model_stock"):  # no search: the same soup, the same key
        assert soup_key(grid, pretrained, metas, val, method) == soup_key(fine, pretrained, metas, val, method)
    for method in ("wiseft_best", "task_arithmetic", "ties", "dare", "dare_ties"):
        assert soup_key(grid, pretrained, metas, val, method) != soup_key(fine, pretrained, metas, val, method)


def test_float64_checkpoints_are_summed_in_float64_whatever_soup_accumulate_says():
    f64 = {"w": TensorInfo(torch.float64, (2,), 0, 16), "steps": TensorInfo(torch.int64, (), 16, 24)}
    f32 = {"w": TensorInfo(torch.float32, (2,), 0, 8), "steps": TensorInfo(torch.int64, (), 8, 16)}
    assert accumulation("float32", f64) == accumulation("float64", f64) == torch.float64
    assert accumulation("float32", f32) == torch.float32 and accumulation("float64", f32) == torch.float64
