"""With BatchNorm re-estimation on, the greedy soup scores every candidate exactly as it publishes it."""

from __future__ import annotations

import numpy as np
import pytest

from model_soups.config import parse_config
from model_soups.context import RunContext
from model_soups.cooking import cook_soup, pantry_for
from model_soups.evaluate import evaluate_ingredient, load_model, predict
from model_soups.ingredients import ensure_pretrained, train_ingredient
from model_soups.processes import device_slots
from tests.conftest import small_digits

pytestmark = pytest.mark.slow


def test_published_greedy_soup_with_recomputed_batchnorm_keeps_the_greedy_invariant(tmp_path):
    # fine-tunes that differ only in their seed, so that the greedy soup keeps several and re-estimation matters
    data = small_digits(f"file://{tmp_path}", experiment="bn", n=5, lr=[1e-3], epochs=[3], max_steps=[200], mixup=[0.0],
                        augment=[0.0], label_smoothing=[0.0], weight_decay=[0.0])
    data["recipe"]["options"].update(norm="batch", width=16, pretrain_examples=3000, pretrain_epochs=3)
    data["soup"] = {"methods": ["greedy"], "final": "greedy", "recompute_bn": True, "recompute_bn_examples": 300}
    config = parse_config(data)
    log = lambda line: None  # noqa: E731
    ctx = RunContext.of(config)
    pretrained = ensure_pretrained(ctx, log)
    slot = device_slots(1)[0]
    metas = [train_ingredient(ctx, pretrained, spec, slot, log) for spec in ctx.plan.specs]
    val_accuracy = {m.id: evaluate_ingredient(ctx.store, ctx.layout, ctx.recipe, m, "val", log).accuracy for m in metas}

    with pantry_for(ctx, pretrained, metas) as checkpoints:
        record = cook_soup(ctx, checkpoints, pretrained, metas, val_accuracy, "greedy", log)

    published_val = record.metrics["val"].accuracy
    accepted = [step for step in record.trajectory if step.accepted]
    assert len(accepted) >= 2 and record.batchnorm == "recomputed on 300 train examples"
    assert published_val == accepted[-1].soup_val
    assert published_val >= max(val_accuracy.values())
    # the published checkpoint (its re-estimated statistics saved in it), evaluated afresh, gives the stored val logits
    model = load_model(ctx.recipe, ctx.store.load_checkpoint(record.checkpoint, record.sha256))
    logits = predict(model, ctx.recipe.dataset("val"), ctx.recipe.eval_batch_size)
    assert np.array_equal(ctx.store.read_arrays(ctx.layout.soup_logits(record.key, "val"))["logits"], logits)
