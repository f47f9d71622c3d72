"""The soup methods there are: each one's name, its options (its section `soup.<name>` of the config), the soup
it builds on and the fewest ingredients it takes. Plain data that the config reads without importing torch;
each method's body is in soups.py, one decorated function per name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _values(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("empty: give one value (fixed) or several (chosen on val)")
    return [value] if isinstance(value, (int, float)) else value


def _grid(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A list of values chosen among on val, each in its range; one number fixes the value."""
    bounds = {"gt" if low_open else "ge": low, "lt" if high_open else "le": high}
    return Annotated[list[Annotated[float, Field(allow_inf_nan=False, **bounds)]], BeforeValidator(_values)]


Alphas, Scales, TopK, Drops = _grid(0, 1), _grid(0, 10, low_open=True), _grid(0, 100, low_open=True), _grid(0, 1, high_open=True)
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SUM_SCALES = [0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0]  # lambda on a sum of N deltas: 1/N is the uniform soup
MEAN_SCALES = [0.5, 0.8, 1.0, 1.2, 1.5, 1.8]  # lambda on TIES's disjoint mean: 1 keeps the mean's magnitude


class WiseFTOptions(MethodOptions):
    on: str = Field("greedy", description="the soup interpolated with the pretrained start: one of soup.methods")
    alpha: Alphas = Field(default_factory=lambda: list(ALPHAS), description="alpha in (1-alpha)*theta_0 + alpha*theta_soup, "
                          "chosen on val among these (one value fixes it); 0 is the pretrained start, 1 the soup")


class WiseFTBestOptions(MethodOptions):
    alpha: Alphas = Field(default_factory=lambda: list(ALPHAS), description="alpha in (1-alpha)*theta_0 + "
                          "alpha*theta_best, chosen on val among these (one value fixes it)")


class TaskArithmeticOptions(MethodOptions):
    scale: Scales = Field(default_factory=lambda: list(SUM_SCALES), description="lambda in theta_0 + lambda * "
                          "sum_i (theta_i - theta_0), in (0, 10], chosen on val among these (one value fixes it)")


class TiesOptions(MethodOptions):
    top_k: TopK = Field([10.0, 20.0, 50.0], description="% of each delta's entries kept by magnitude (per tensor), in "
                        "(0, 100], chosen on val among these")
    scale: Scales = Field(default_factory=lambda: list(MEAN_SCALES), description="lambda on the disjoint mean, in (0, 10], "
                          "chosen on val among these")


class DareOptions(MethodOptions):
    drop: Drops = Field([0.5, 0.9], description="probability p that a delta entry is dropped (the rest are rescaled by "
                        "1/(1-p)), in [0, 1), chosen on val among these")
    scale: Scales = Field(default_factory=lambda: list(SUM_SCALES), description="lambda on the sum of the dropped and "
                          "rescaled deltas, as in task arithmetic, chosen on val among these")
    seed: int = Field(0, description="seed of the drop masks (one per ingredient and tensor)")


class DareTiesOptions(DareOptions):
    scale: Scales = Field(default_factory=lambda: list(MEAN_SCALES), description="lambda on the disjoint mean of the "
                          "dropped and rescaled deltas, as in TIES, chosen on val among these")


class LearnedOptions(MethodOptions):
    steps: int = Field(100, ge=0, description="Adam steps, each on one batch of val examples")
    granularity: Literal["global", "per-layer"] = Field("per-layer", description="one softmax of mixing weights per "
                                                        "tensor, or one for the whole model")
    models_per_step: int = Field(4, ge=1, description="ingredients whose weights one step updates, drawn at random "
                                 "(MEHL-Soup's batch of models); the others keep theirs. N or more: all, every step")
    lr: float = Field(0.05, gt=0, description="Adam's learning rate on the weights' logits")


@dataclass(frozen=True)
class SoupMethod:
    name: str
    options: type[MethodOptions] | None = None  # its section `soup.<name>` of the config
    builds_on: Callable[[Any], str] | None = None  # from its own options: the method whose soup it needs
    min_ingredients: int = 1  # a run that cooks it with fewer is refused before any training
    family: str = "weight average"  # the report groups methods by it
    searches: bool = False  # chooses its merge on val among candidates, as soup.search says (`soups.search`)
    about: str = ""  # one line, shown with its options in the config's form

    @property
    def kind(self) -> str:
        """Its `kind` in results.csv."""
        return f"{self.name}_soup"

    def base(self, soup_options: BaseModel) -> str | None:
        """The method whose soup this one builds on (cooked first), as the config's `soup` section sets it."""
        return self.builds_on(getattr(soup_options, self.name)) if self.builds_on is not None else None


MERGE = "task-vector merge"
# The one registry, in the order the report shows them: the config's allowed methods, results.csv's kinds.
SOUP_METHODS: dict[str, SoupMethod] = {method.name: method for method in (
    SoupMethod("uniform", about="The plain average of every ingredient (the paper's uniform soup)."),
    SoupMethod("greedy", about="Recipe 1 of the paper: add the next-best ingredient if val accuracy does not drop."),
    SoupMethod("learned", LearnedOptions, about="Mixing weights (a softmax per tensor, or one global) fitted on val by "
               "Adam, a few ingredients per step."),
    SoupMethod("wiseft", WiseFTOptions, builds_on=lambda options: options.on, family=MERGE, searches=True,
               about="WiSE-FT (Wortsman et al., CVPR 2022) of a soup: (1-alpha)*theta_0 + alpha*theta_soup, alpha "
               "chosen on val."),
    SoupMethod("wiseft_best", WiseFTBestOptions, family=MERGE, searches=True, about="WiSE-FT of the best individual fine-tune."),
    SoupMethod("task_arithmetic", TaskArithmeticOptions, family=MERGE, searches=True, about="Task arithmetic (Ilharco et al., ICLR "
               "2023): theta_0 + lambda * sum of the deltas, lambda chosen on val."),
    SoupMethod("ties", TiesOptions, family=MERGE, searches=True, about="TIES-merging: trim each delta to its top-k%, elect signs, "
               "disjoint mean; k and lambda chosen on val."),
    SoupMethod("dare", DareOptions, family=MERGE, searches=True, about="DARE with the linear merge: drop and rescale every delta, then "
               "task arithmetic; p and lambda chosen on val."),
    SoupMethod("dare_ties", DareTiesOptions, family=MERGE, searches=True, about="DARE with the TIES merge: drop and rescale every "
               "delta, elect signs, disjoint mean."),
    SoupMethod("model_stock", min_ingredients=2, about="Model Stock (Jang et al., ECCV 2024): per tensor theta_0 + t * "
               "mean delta, t from the deltas' angle; no val."),
)}
