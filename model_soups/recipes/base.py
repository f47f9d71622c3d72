"""What every recipe is (`Recipe`: a model, its data and training defaults) and how one is found by name or by its
'package.module:Class' path."""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from model_soups.recipes import RECIPES
from model_soups.validation import ConfigError, describe_validation_error



class Hyperparameters(BaseModel):
    """What one fine-tune is allowed to vary; a recipe may subclass it to add its own."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    epochs: int = Field(4, ge=1, le=1000)
    batch_size: int = Field(64, ge=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0, description="Beta(alpha, alpha) mixup; 0 turns it off")
    augment: float = Field(0.0, ge=0, le=4, description="augmentation strength; 0 turns it off")
    seed: int = 0
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (short smoke runs)")


@dataclass
class SplitData:
    """One split as tensors whose first dimension is the example: model inputs (keyword args) and labels.

    Sequences carry `lengths` (real tokens, right-padded to the split's longest): a batch is then cut to its
    own longest sequence, as `DataCollatorWithPadding` pads per batch.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        if self.lengths is None:
            return {name: value[index] for name, value in self.inputs.items()}
        longest = int(self.lengths[index].max())
        return {name: value[index, :longest] for name, value in self.inputs.items()}

    def subset(self, index: torch.Tensor) -> "SplitData":
        return SplitData({name: value[index] for name, value in self.inputs.items()}, self.labels[index],
                         None if self.lengths is None else self.lengths[index])


class Recipe(abc.ABC):
    """Base of every recipe. A model is called as `model(**inputs)` and returns logits (or `.logits`)."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    Hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters
    default_search: ClassVar[dict[str, JsonValue]] = {}  # as sweep.params: name -> choices, or {low, high, log}
    supports_mixup: ClassVar[bool] = True
    supports_augment: ClassVar[bool] = True
    eval_batch_size: ClassVar[int] = 256

    def __init__(self, options: BaseModel | dict[str, object] | None = None):
        try:
            self.options = self.Options.model_validate(options or {})
        except ValidationError as error:
            raise ConfigError(
                describe_validation_error(error, self.Options, f"invalid recipe.options for {self.name!r}", "recipe.options.")
            ) from None
        self._splits: dict[str, SplitData] = {}  # `dataset`'s: loaded once per recipe, which a run's context shares
        self._loading = threading.Lock()

    def describe(self) -> dict[str, JsonValue]:
        return {"recipe": self.name, "options": self.options.model_dump(mode="json")}

    def fingerprint(self) -> str:
        """Identity of the pretrained start and the data: part of every ingredient id."""
        return stable_hash({**self.describe(), "data": self.data_fingerprint()})

    @abc.abstractmethod
    def data_fingerprint(self) -> str:
        ...

    @abc.abstractmethod
    def splits(self) -> list[str]:
        """Evaluation splits: 'val', 'test' and any 'ood:<name>'."""

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        ...

    @abc.abstractmethod
    def make_pretrained(self) -> dict[str, torch.Tensor]:
        """The shared starting point of every ingredient, built deterministically."""

    @abc.abstractmethod
    def load_split(self, split: str) -> SplitData:
        ...

    def dataset(self, split: str) -> SplitData:
        """`load_split`, done once per recipe: every evaluation and soup of a run shares its context's recipe, so a
        split is read and tokenized once per process. Callers must not change the tensors."""
        with self._loading:
            if split not in self._splits:
                self._splits[split] = self.load_split(split)
            return self._splits[split]

    def export_pretrained(self, state: dict[str, torch.Tensor], folder: Path) -> dict[str, str] | None:
        """Write `state` into `folder` as a Hugging Face model folder (`from_pretrained` loads it) and return what
        its model card's metadata says of it (base_model, license); None when the recipe's model is not a
        transformers model."""
        return None

    def augment(self, inputs: dict[str, torch.Tensor], strength: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return inputs

    @property
    def group_by_length(self) -> bool:
        """Training batches of similar lengths (for sequences); part of the options, so of every ingredient id."""
        return False

    def check_split(self, split: str) -> None:
        if split != "train" and split not in self.splits():
            raise ConfigError(f"recipe {self.name!r} has no split {split!r}; splits: train, {', '.join(self.splits())}")


def recipe_class(name: str) -> type[Recipe]:
    """A built-in recipe by name, or any Recipe subclass by its 'package.module:Class' path."""
    path = RECIPES[name].path if name in RECIPES else name
    if ":" not in path:
        raise ConfigError(f"unknown recipe {name!r}; registered: {', '.join(RECIPES)}, or 'package.module:Class'")
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"recipe {name!r}: cannot import ({error}); expected 'package.module:Class'") from None
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise ConfigError(f"recipe {name!r}: {class_name} is not a model_soups.recipes.base.Recipe subclass")
    return cls


def get_recipe(name: str, options: BaseModel | dict[str, object] | None = None) -> Recipe:
    return recipe_class(name)(options)


def fit_linear_probe(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> None:
    """The LP of LP-FT: fit `head` on frozen features, from where it stands (full batch, L-BFGS, a little L2).

    In float64, Newton steps then take the fit to the optimum, to the last bits. L-BFGS stops about 1e-2 short of it,
    on a path that the loss's last bits steer, so two CPUs' kernels came out 1e-4 to 1e-2 apart from inputs 1e-16
    apart; after Newton, 1e-14."""
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")
    k, d = head.weight.shape

    def loss_of(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.functional.linear(features, weight, bias)  # head(features), as nn.Linear computes it
        return torch.nn.functional.cross_entropy(linear, labels) + 1e-3 * weight.square().sum()

    def closure():
        optimizer.zero_grad()
        loss = loss_of(head.weight, head.bias)
        loss.backward()
        return loss

    optimizer.step(closure)
    if features.dtype != torch.float64:
        return

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return loss_of(theta[:k * d].view(k, d), theta[k * d:])

    theta = torch.cat([head.weight.detach().flatten(), head.bias.detach()])
    for _ in range(4):  # quadratic convergence: 1e-2, 1e-7, 1e-14, then rounding
        hessian, gradient = torch.func.hessian(objective)(theta), torch.func.grad(objective)(theta)
        # least squares: the loss does not change when every bias moves by the same amount, so the Hessian is singular
        theta = theta - torch.linalg.lstsq(hessian, gradient[:, None], driver="gelsd").solution[:, 0]
    with torch.no_grad():
        head.weight.copy_(theta[:k * d].view(k, d))
        head.bias.copy_(theta[k * d:])


def stable_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits
