"""The learned soup's machinery (its body is `soups.learned_soup`): the gradient of the loss in each ingredient's
weight as a projection taken while backward runs, the ingredients streamed one tensor at a time, a step's val batch
cut by length, and Adam on the weights of the ingredients drawn for a step."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Container, Iterator, Mapping, Sequence

import torch

from model_soups.merge import Checkpoints, Ingredient
from model_soups.recipes.base import SplitData


# A step's batch of sequences is cut into this many parts of similar length, each padded to its own longest: on
# text (64 SST-2 sentences of 13 tokens on average, padded to 30-56), forward and backward take 0.58 s a step on
# 2 cores instead of 1.11 s (2 parts: 0.69 s, 8 parts: 0.63 s).
LENGTH_PARTS = 4


def by_length(data: SplitData, index: torch.Tensor) -> list[torch.Tensor]:
    """`index` as parts of similar length (up to LENGTH_PARTS, none empty, shortest first), or whole as given when
    `data` has no sequences."""
    if data.lengths is None:
        return [index]
    shortest_first = index[torch.argsort(data.lengths[index], stable=True)]
    return [part for part in shortest_first.tensor_split(LENGTH_PARTS) if len(part)]


@contextmanager
def project_gradients(model: torch.nn.Module, rows: Mapping[str, int], n_rows: int, readers: Sequence,
                      scratch: torch.Tensor):
    """While a backward pass runs: <g, theta> (`mixed`, per row) and <g, tensor of reader j> (`projected`, per row
    and reader, read into `scratch`) for each parameter's gradient g as soon as it is accumulated (on top of what
    earlier backward passes left in .grad), which is then freed."""
    mixed = torch.zeros(n_rows, dtype=torch.float64)
    projected = torch.zeros(n_rows, len(readers), dtype=torch.float64)

    def project(name: str, parameter: torch.Tensor) -> None:
        g, row = parameter.grad, rows[name]
        mixed[row] += dot(g, parameter.detach())
        for j, reader in enumerate(readers):
            projected[row, j] += dot(g, reader.tensor(name, scratch).to(g.device))
        parameter.grad = None

    hooks = [p.register_post_accumulate_grad_hook(partial(project, name)) for name, p in model.named_parameters()]
    try:
        yield mixed, projected
    finally:
        for hook in hooks:
            hook.remove()


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.vdot(a.flatten(), b.flatten()))


def stream(store: Checkpoints, ingredients: Sequence[Ingredient], names: Container[str],
           scratch: torch.Tensor) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(index of the ingredient, name, tensor) for the tensors in `names`, one at a time, each file front to back;
    each tensor is valid until the next (a view of `scratch` when read from storage)."""
    for j, ingredient in enumerate(ingredients):
        with store.open_checkpoint(ingredient.url, ingredient.sha256, sequential=True) as reader:
            for name in reader.info:
                if name in names:
                    yield j, name, reader.tensor(name, scratch)


class SubsetAdam:
    """Adam on the columns of `param` given at each step, each with its own step count; the others do not move
    (torch's Adam would still move them by their momentum). With every column at every step, it is torch's Adam."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.count = torch.zeros(param.shape[1], dtype=torch.float64)

    def step(self, columns: list[int], grad: torch.Tensor) -> None:
        (b1, b2), cols = self.betas, torch.tensor(columns)
        self.count[cols] += 1
        self.m[:, cols] = b1 * self.m[:, cols] + (1 - b1) * grad
        self.v[:, cols] = b2 * self.v[:, cols] + (1 - b2) * grad * grad
        m_hat = self.m[:, cols] / (1 - b1 ** self.count[cols])
        v_hat = self.v[:, cols] / (1 - b2 ** self.count[cols])
        self.param[:, cols] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
