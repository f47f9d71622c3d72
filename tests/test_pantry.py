"""A cooking run through its pantry: each checkpoint read from storage once for every soup, the soups byte for byte
those of reads from storage each time; the coarse-to-fine search against the grid on the same fixed run; and the
pantry alone, on local disk and S3: what it holds, what it reads again, what it refuses."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from model_soups import cooking
from model_soups.config import parse_config
from model_soups.context import RunContext
from model_soups.evaluate import evaluate_ingredient, load_model, predict
from model_soups.ingredients import ensure_pretrained, train_ingredient
from model_soups.merge import weighted_average
from model_soups.methods import SOUP_METHODS
from model_soups.pantry import Pantry
from model_soups.processes import device_slots
from model_soups.soups import coarse_to_fine
from model_soups.storage import CorruptCheckpoint
from tests.conftest import small_digits
from tests.test_merge import any_store, perturbed_states, save_all  # noqa: F401 (fixture)

SEARCHED = [name for name, method in SOUP_METHODS.items() if method.searches]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fixed run: the pretrained start and 5 fine-tunes of it, evaluated on val."""
    root = tmp_path_factory.mktemp("pantry")
    data = small_digits(f"file://{root}", experiment="pantry", n=5, lr=[0.003, 0.01, 0.03], max_steps=[40])
    ctx = RunContext.of(parse_config(data))
    log = lambda line: None  # noqa: E731
    pretrained = ensure_pretrained(ctx, log)
    slot = device_slots(1)[0]
    metas = [train_ingredient(ctx, pretrained, spec, slot, log) for spec in ctx.plan.specs]
    val = {m.id: evaluate_ingredient(ctx.store, ctx.layout, ctx.recipe, m, "val", log).accuracy for m in metas}
    return ctx, pretrained, metas, val


def cook_all(ctx, pretrained, metas, val, methods, memory_mb=4096.0, search="coarse-to-fine"):
    """Every soup of `methods` as the flow cooks them, through one pantry; the soups folder emptied first, so that
    nothing is reused."""
    config = ctx.config.model_copy(update={
        "soup": ctx.config.soup.model_copy(update={"methods": methods, "search": search}),
        "execution": ctx.config.execution.model_copy(update={"cook_memory_mb": memory_mb})})
    ctx = dataclasses.replace(ctx, config=config)
    ctx.store.delete(ctx.store.url(ctx.layout.experiment, "soups"))
    log = lambda line: None  # noqa: E731
    with cooking.pantry_for(ctx, pretrained, metas) as pantry:
        records = {m: cooking.cook_soup(ctx, pantry, pretrained, metas, val, m, log) for m in methods
                   if SOUP_METHODS[m].base(config.soup) is None}
        for m in methods:
            if m not in records:
                records[m] = cooking.cook_soup(ctx, pantry, pretrained, metas, val, m, log,
                                               records[SOUP_METHODS[m].base(config.soup)])
        return records, dict(pantry.reads)


@pytest.mark.slow
def test_a_cooking_run_reads_each_checkpoint_once_and_cooks_the_soups_streamed_reads_cook(run, monkeypatch):
    ctx, pretrained, metas, val = run
    opened = Counter()
    fs_open = ctx.store.fs.open

    def counting(path, mode="rb", *args, **kwargs):
        if "r" in mode and str(path).endswith(".safetensors"):
            opened[str(path)] += 1
        return fs_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ctx.store.fs, "open", counting)
    ctx.store.checkpoints_read.clear()
    methods = list(SOUP_METHODS)
    held, reads = cook_all(ctx, pretrained, metas, val, methods)
    checkpoints = [pretrained.url] + [m.checkpoint for m in metas]
    # opened once each (a local file is mapped, not opened through fsspec), and never read whole again to hash it
    assert {url: ctx.store.checkpoints_read[url] for url in checkpoints} == {url: 1 for url in checkpoints}
    assert not opened
    assert set(reads.values()) == {1} and len(reads) == len(checkpoints)

    for method, record in held.items():  # a soup's val logits, taken from its scoring, are its own forward pass's
        model = load_model(ctx.recipe, ctx.store.load_checkpoint(record.checkpoint, record.sha256))
        logits = predict(model, ctx.recipe.dataset("val"), ctx.recipe.eval_batch_size)
        assert np.array_equal(ctx.store.read_arrays(ctx.layout.soup_logits(record.key, "val"))["logits"], logits), method

    ctx.store.checkpoints_read.clear()
    streamed, reads = cook_all(ctx, pretrained, metas, val, methods, memory_mb=0)
    assert all(ctx.store.checkpoints_read[url] > 1 for url in checkpoints)  # nothing held: read again whenever used
    assert {m: r.sha256 for m, r in streamed.items()} == {m: r.sha256 for m, r in held.items()}
    assert {m: r.logits_sha256 for m, r in streamed.items()} == {m: r.logits_sha256 for m, r in held.items()}


@pytest.mark.slow
def test_coarse_to_fine_chooses_as_the_grid_does_in_fewer_evaluations(run):
    ctx, pretrained, metas, val = run
    methods = ["greedy", *SEARCHED]  # WiSE-FT builds on the greedy soup
    grid, _ = cook_all(ctx, pretrained, metas, val, methods, search="grid")
    fine, _ = cook_all(ctx, pretrained, metas, val, methods)
    for method in SEARCHED:
        chosen_grid = next(step for step in grid[method].trajectory if step.chosen)
        chosen_fine = next(step for step in fine[method].trajectory if step.chosen)
        assert chosen_fine.soup_val >= chosen_grid.soup_val, method
        if fine[method].task == grid[method].task:  # the same choice: the same soup, byte for byte
            assert fine[method].sha256 == grid[method].sha256, method
    assert sum(fine[m].candidate_evaluations for m in SEARCHED) < sum(grid[m].candidate_evaluations for m in SEARCHED)


@pytest.mark.parametrize("curve", [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],      # rising: the last point
    [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1],      # falling: the first
    [1, 3, 5, 7, 9, 10, 8, 6, 4, 2, 0],       # a peak at an odd position, between two coarse points
    [0, 5, 5, 5, 1, 0],                        # a plateau: its first point, as the grid's first of equals
    [3], [1, 2], [2, 1, 0],
])
def test_coarse_to_fine_finds_the_peak_of_a_line_that_rises_then_falls(curve):
    scored = coarse_to_fine(len(curve), lambda p: curve[p])
    best = max(scored, key=lambda p: (scored[p], -p))
    assert best == curve.index(max(curve))
    assert len(scored) <= len(curve) // 2 + 3


def test_the_pantry_holds_what_fits_reads_the_rest_again_and_sums_what_the_store_sums(any_store):
    states = perturbed_states(3)
    ingredients = save_all(any_store, states)
    size = sum(t.numel() * t.element_size() for t in states[0].values())
    with Pantry(any_store, ingredients, memory_mb=2.5 * size / 2**20) as pantry:
        for _ in range(2):
            for ingredient in ingredients:
                with pantry.open_checkpoint(ingredient.url) as reader:
                    state = states[ingredients.index(ingredient)]
                    assert all(torch.equal(reader.tensor(name), value) for name, value in state.items())
        assert list(pantry.held) == [i.url for i in ingredients[:2]] and pantry.used == 2 * size
        assert [pantry.reads[i.url] for i in ingredients] == [1, 1, 2]  # the third did not fit: read again
        summed = weighted_average(pantry, ingredients)
        summed_twice = weighted_average(pantry, ingredients)  # a held tensor is never summed into in place
        streamed = weighted_average(any_store, ingredients)
        assert all(torch.equal(summed[k], streamed[k]) and torch.equal(summed_twice[k], streamed[k]) for k in streamed)
        held = pantry.held[ingredients[0].url]
        assert all(torch.equal(held.tensor(k), v) for k, v in states[0].items())


@pytest.mark.parametrize("memory_mb", [0, 64])
def test_the_pantry_refuses_a_checkpoint_that_does_not_match_its_sha256(any_store, memory_mb):
    (ingredient,) = save_all(any_store, perturbed_states(1))
    data = bytearray(any_store.read_bytes(ingredient.url))
    data[-1] ^= 0xFF  # one bit of the last tensor
    any_store.write_bytes(ingredient.url, bytes(data))
    with Pantry(any_store, [ingredient], memory_mb) as pantry:
        with pytest.raises(CorruptCheckpoint, match="sha256"):
            with pantry.open_checkpoint(ingredient.url) as reader:
                for name in reader.info:
                    reader.tensor(name)
        assert not pantry.held
