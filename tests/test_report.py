"""The report says in words what happened: the val set's resolution, and a greedy soup of one ingredient."""

from __future__ import annotations

import pandas as pd

from model_soups.records import GreedyStep
from model_soups.report import ONE_INGREDIENT, what_happened


def trajectory(accepted: list[bool]) -> list[GreedyStep]:
    return [GreedyStep(ingredient=f"i{k}", individual_val=0.9, soup_val=0.9 + 0.001 * k, accepted=a, size=0)
            for k, a in enumerate(accepted)]


RESULTS = pd.DataFrame([{"model": "i0", "kind": "ingredient", "split": "val", "accuracy": 0.9, "n": 600},
                        {"model": "i0", "kind": "ingredient", "split": "test", "accuracy": 0.9, "n": 500}])


def test_val_size_and_the_value_of_one_example_are_stated():
    assert "Val has 600 examples: one example is 0.17 points." in what_happened(RESULTS, [])


def test_one_ingredient_sentence_appears_exactly_when_the_greedy_soup_kept_one():
    assert ONE_INGREDIENT in what_happened(RESULTS, trajectory([True, False, False]))
    assert ONE_INGREDIENT in what_happened(RESULTS, trajectory([True]))
    several = what_happened(RESULTS, trajectory([True, False, True]))
    assert ONE_INGREDIENT not in several and "kept 2 of 3 ingredients: val 90.20 against 90.00" in several
    assert ONE_INGREDIENT not in what_happened(RESULTS, [])  # no greedy soup cooked
