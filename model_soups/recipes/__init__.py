"""Recipes: a model, its data and training defaults. One registry; users add theirs by dotted path.

This module is the registry, plain data that the config reads without importing torch: each built-in recipe's
'package.module:Class' path and its options. `base` has what every recipe is, and finds one by name or path.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from model_soups.recipes.options import DigitsOptions, TextOptions


@dataclass(frozen=True)
class BuiltInRecipe:
    path: str  # 'package.module:Class': bring your own recipe the same way
    options: type[BaseModel]  # its `recipe.options`
    about: str  # one line, shown with its options in the config's form


RECIPES = {
    "digits": BuiltInRecipe("model_soups.recipes.digits:Digits", DigitsOptions, "The embedded default: scikit-learn's "
                            "handwritten digits, from a start pretrained on printed digits."),
    "text": BuiltInRecipe("model_soups.recipes.text:Text", TextOptions, "A transformers encoder (all-MiniLM-L6-v2 by "
                          "default) fine-tuned on your CSV, TSV or parquet files."),
}
