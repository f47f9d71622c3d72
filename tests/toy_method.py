"""A toy soup method, declared and cooked from outside the package as a user's own would be: the average of the two
best ingredients. Imported before the config, whose allowed `soup.methods` are the registry's when it is imported."""

from __future__ import annotations

from model_soups.methods import SOUP_METHODS, SoupMethod

SOUP_METHODS["top_two"] = SoupMethod("top_two", min_ingredients=2, about="The average of the two best ingredients.")

from model_soups.soups import Soup, SoupContext, soup_method  # noqa: E402 - after its declaration


@soup_method("top_two")
def top_two(ctx: SoupContext, o: None = None) -> Soup:
    return Soup("top_two", list(ctx.ranked[:2]), [1.0, 1.0])
