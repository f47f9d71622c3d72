"""The run configuration: one pydantic model for YAML files, `soup run --set` flags and the Prefect form."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model,
                      field_validator, model_validator)

from model_soups.methods import SOUP_METHODS
from model_soups.recipes import RECIPES
from model_soups.storage.backends import StorageConfig, backend_of
from model_soups.validation import ConfigError, describe_validation_error

# The soup methods declared in methods.py: the allowed values here, in YAML, `--set` flags and the Prefect form.
SoupMethodName = Literal[tuple(SOUP_METHODS)]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# user:password@ in a URL, or a signed or token query parameter (presigned S3 URLs, SAS tokens)
URL_CREDENTIALS = re.compile(r"://[^/@\s]+:[^/@\s]*@|[?&](X-Amz-Signature|X-Amz-Security-Token|X-Amz-Credential|sig|token|"
                             r"access_token|api_key)=", re.IGNORECASE)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CustomRecipe(Strict):
    """Your own Recipe subclass, named by its import path."""

    name: str = Field(description="'package.module:Class' of a model_soups.recipes.base.Recipe subclass")
    options: dict[str, Any] = Field(default_factory=dict, description="that recipe's options (its Options model checks them)")

    @field_validator("name")
    @classmethod
    def _import_path(cls, name: str) -> str:
        if not re.fullmatch(r"[\w.]+:\w+", name):
            raise ValueError(f"unknown recipe {name!r}; registered: {', '.join(RECIPES)}, or 'package.module:Class'")
        return name


def _recipe_tag(value: Any) -> str:
    name = value.get("name", "digits") if isinstance(value, dict) else getattr(value, "name", "digits")
    return name if name in RECIPES else "custom"


def _recipe_section(name: str) -> Any:
    """`{name, options}` for one built-in recipe, with that recipe's own options model."""
    recipe = RECIPES[name]
    section = create_model(f"{name.capitalize()}Recipe", __base__=Strict, __doc__=recipe.about,
                           name=(Literal[name], name), options=(recipe.options, Field(default_factory=recipe.options)))
    return Annotated[section, Tag(name)]


# One section per recipe in the registry (recipes.RECIPES), told apart by `name`: the Prefect form shows each
# recipe's own options as fields.
RecipeConfig = Annotated[Union[tuple(_recipe_section(name) for name in RECIPES) + (Annotated[CustomRecipe, Tag("custom")],)],
                         Discriminator(_recipe_tag)]


class Range(Strict):
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class StopRule(Strict):
    """Fine-tune in rounds and stop once the greedy soup stops gaining (a random or grid search, in sweep order)."""

    first: int = Field(4, ge=2, description="fine-tunes of the first round")
    batch: int = Field(2, ge=1, description="fine-tunes of every later round")
    patience: int = Field(2, ge=1, description="stop after this many rounds in a row that each raised the greedy "
                          "soup's val accuracy by less than min_gain")
    min_gain: float = Field(0.001, ge=0, le=1, description="the rise in the greedy soup's val accuracy (a fraction: "
                            "0.001 is 0.1 points) below which a round counts as no gain")


class SearchSpace(Strict):
    strategy: Literal["grid", "random", "soup-aware"] = Field(
        "random", description="grid: every combination; random: n samples; soup-aware: n fine-tunes in rounds, each "
        "round's hyperparameters chosen (Optuna TPE) for what they add to the greedy soup on val (sweep.objective)")
    n: int = Field(10, ge=1, le=10_000, description="ingredients drawn by random search, or fine-tuned by a soup-aware one")
    initial: int = Field(4, ge=1, description="soup-aware: fine-tunes of the first round, drawn at random")
    batch: int = Field(4, ge=1, description="soup-aware: fine-tunes proposed per later round")
    objective: Literal["nll", "accuracy"] = Field(
        "nll", description="soup-aware: what a fine-tune is worth to the sampler, the fall in the greedy soup's val NLL "
        "when it joins (smooth) or the rise in its val accuracy (a few examples' worth)")
    seed: int = Field(0, description="seed of the random search, or of a soup-aware one's samplers")
    params: dict[str, list[Any] | Range] = Field(
        default_factory=dict,
        description="hyperparameter -> list of choices, or {low, high, log} for random search; a random "
        "search also varies the recipe's default search space, a grid only what is given here",
    )
    checkpoints: list[str] = Field(
        default_factory=list, description="existing ingredient checkpoints (fsspec URLs) to add to the soup"
    )
    stop: StopRule | None = Field(None, description="fine-tune in rounds and stop when the greedy soup stops gaining "
                                  "on val (null: every planned fine-tune)")

    @model_validator(mode="after")
    def _stop_needs_a_planned_sweep(self) -> "SearchSpace":
        if self.stop is not None and self.strategy == "soup-aware":
            raise ValueError("sweep.stop: a soup-aware sweep plans its own rounds up to sweep.n; stopping early is for "
                             "strategy random or grid (set sweep.stop to null, or change sweep.strategy)")
        return self


class SoupCommon(Strict):
    methods: list[SoupMethodName] = Field(default_factory=lambda: list(SOUP_METHODS), description="which soups to cook")
    final: SoupMethodName = Field("greedy", description="the soup that is published")
    rule: Literal[">=", ">"] = Field(
        ">=", description="greedy acceptance: the paper's >= (ties accepted) or the official code's >"
    )
    ensembles: bool = Field(True, description="also report the ensemble and greedy ensemble from stored logits")
    accumulate: Literal["float32", "float64"] = Field(
        "float32", description="accumulation dtype of averages (float64 checkpoints are always summed in float64)")
    search: Literal["grid", "coarse-to-fine"] = Field(
        "coarse-to-fine", description="how a task-vector soup searches each line of its grid (its alpha or lambda "
        "values, per TIES k or DARE p) on val: every value (grid), or every other value, then the best one's "
        "neighbours while val rises (coarse-to-fine: the grid's choice wherever val rises then falls along the line, "
        "in about half the evaluations)")
    recompute_bn: bool = Field(
        False, description="re-estimate BatchNorm statistics on train data for every soup of 2+ ingredients; the greedy "
        "soup does it for each candidate too (one more forward pass over recompute_bn_examples each), so it scores "
        "candidates exactly as it publishes them")
    recompute_bn_examples: int = Field(2048, ge=1, description="the fixed train examples BatchNorm is re-estimated on")

    @model_validator(mode="before")
    @classmethod
    def _renamed_learned_options(cls, data: Any) -> Any:
        renamed = {"learned_steps": "steps", "learned_granularity": "granularity"}
        old = [name for name in renamed if isinstance(data, dict) and name in data]
        if old:
            raise ValueError(f"{', '.join(old)} moved into the learned soup's own section: write "
                             f"learned: {{{', '.join(f'{renamed[n]}: ...' for n in old)}}} under soup")
        return data

    @model_validator(mode="after")
    def _builds_on_a_cooked_soup(self) -> "SoupCommon":
        for name in {*self.methods, self.final}:
            on, field = SOUP_METHODS[name].base(self), f"{name}.on"
            if on is None:
                continue
            independent = [m for m in SOUP_METHODS if SOUP_METHODS[m].builds_on is None]
            if on not in independent:
                raise ValueError(f"{field}: {on!r} is not a soup it can build on; one of {', '.join(independent)}")
            if on not in self.methods:
                raise ValueError(f"{field}: the {on} soup is not cooked; add {on!r} to soup.methods")
        return self


# The common options, and one section per soup method that has options (methods.SOUP_METHODS), e.g. `soup.ties`.
SoupOptions = create_model("SoupOptions", __base__=SoupCommon, **{
    m.name: (m.options, Field(default_factory=m.options, description=m.about))
    for m in SOUP_METHODS.values() if m.options is not None})


class ExecutionConfig(Strict):
    device_slots: int | Literal["auto"] = Field(
        "auto", description="parallel fine-tunes: 'auto' = one per CUDA device, else one per CPU core"
    )
    retries: int = Field(1, ge=0, le=10, description="retries of a failed fine-tune before it is left out")
    timeout_s: float = Field(3600, gt=0, description="a fine-tune running longer is killed")
    min_ingredients: int = Field(
        2, ge=1, description="a sweep that plans fewer ingredients is refused before training, and fewer surviving "
        "fails the run; 1 lets a run publish a single model as its 'soup', on purpose")
    lease_s: float = Field(60, ge=3, description="a fine-tune whose lease is not renewed for this long is dead")
    fanout: Literal["local", "work-pool"] = Field(
        "local", description="local: fine-tunes on this machine's device slots; work-pool: as runs of a deployment"
    )
    finetune_deployment: str = Field("finetune/gpu", description="the deployment that fine-tunes in work-pool mode")
    poll_s: float = Field(2, gt=0, le=60, description="how often work-pool mode checks its fine-tune runs")
    pipeline: bool = Field(
        True, description="evaluate each ingredient as soon as its checkpoint is verified, while other fine-tunes still "
        "run; false waits for the last fine-tune first (the result is the same)")
    evaluate_on: Literal["orchestrator", "finetune-worker"] = Field(
        "orchestrator",
        description="where ingredients are evaluated in work-pool mode: by the orchestrating flow run, or by each "
        "fine-tune run right after training, on its GPU",
    )
    cook_on: Literal["orchestrator", "device-pool"] = Field(
        "orchestrator", description="where the soups are cooked: by the orchestrating flow run, or (work-pool mode) by "
        "one run of cook_deployment on the device pool, which reads each checkpoint there while the orchestrator waits")
    cook_deployment: str = Field("cook/gpu", description="the deployment that cooks with cook_on: device-pool")
    cook_memory_mb: float = Field(
        4096, ge=0, description="checkpoints the cooking holds in memory (MB), each read from storage and checked "
        "against its sha256 once for all the soups; those beyond it are read again from local disk (0: none held)")


class RunConfig(Strict):
    """Everything one model-soup run needs."""

    experiment: str = Field("digits-demo", pattern=NAME_PATTERN, description="groups ingredients and runs")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    recipe: RecipeConfig = Field(default_factory=lambda: {"name": "digits"}, validate_default=True, json_schema_extra=lambda schema: schema.update(
        anyOf=schema.pop("oneOf")))  # the Prefect form offers an anyOf of objects as a choice between them
    sweep: SearchSpace = Field(default_factory=SearchSpace)
    soup: SoupOptions = Field(default_factory=SoupOptions)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_urls(cls, data: Any) -> Any:
        """A URL with a password or a token would end up in parameters, logs and the manifest: refuse it."""
        for path, value in _strings(data):
            if URL_CREDENTIALS.search(value):
                raise ValueError(f"{path or 'config'} must not carry credentials (a password or token in a URL); "
                                 "give them to the workers as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile")
        return data

    @model_validator(mode="after")
    def _storage_every_process_sees(self) -> "RunConfig":
        if not backend_of(self.storage.root).shared:
            raise ValueError(f"storage.root {self.storage.root}: only the process that writes it sees it, and a run's "
                             "fine-tunes run in processes of their own; give a local path, file:// or s3:// URL")
        return self

    @model_validator(mode="after")
    def _cooks_on_a_pool_only_in_work_pool_mode(self) -> "RunConfig":
        if self.execution.cook_on == "device-pool" and self.execution.fanout != "work-pool":
            raise ValueError("execution.cook_on: device-pool cooks as a run of execution.cook_deployment on a work pool; "
                             "set execution.fanout: work-pool too, or cook_on: orchestrator to cook on this machine")
        return self

    @model_validator(mode="after")
    def _credentials_stay_on_this_machine(self) -> "RunConfig":
        if self.execution.fanout == "work-pool" and (self.storage.key or self.storage.secret):
            raise ValueError("storage.key / storage.secret cannot travel to workers (parameters never carry secrets); "
                             "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the workers' environment instead")
        return self


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, (list, tuple)):
        return [found for i, item in enumerate(value) for found in _strings(item, f"{path}[{i}]")]
    return []


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, RunConfig)) from None
