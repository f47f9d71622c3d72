"""Streaming weighted averages of checkpoints, one tensor at a time, so memory does not grow with N.

Rules (DESIGN.md): every checkpoint has the pretrained keys, shapes and dtypes; floating tensors are
accumulated in float32 or float64 and written back in their own dtype; integer and boolean buffers come
from the first ingredient; a NaN or Inf rejects the checkpoint.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from model_soups.storage import CheckpointReader, Store, TensorInfo


class CheckpointMismatch(ValueError):
    """A checkpoint's keys, shapes or dtypes differ from the pretrained model's."""


class NonFiniteCheckpoint(ValueError):
    """A checkpoint holds NaN or Inf."""


@dataclass(frozen=True)
class Ingredient:
    """A reference to one stored checkpoint: what soups are made of."""

    id: str
    url: str
    sha256: str | None = None


def check_compatible(reference: Mapping[str, TensorInfo], candidate: Mapping[str, TensorInfo], url: str,
                     reference_name: str = "pretrained") -> None:
    problems = [f"key {k!r} is missing" for k in reference if k not in candidate]
    problems += [f"key {k!r} is unexpected" for k in candidate if k not in reference]
    for key in reference.keys() & candidate.keys():
        ref, got = reference[key], candidate[key]
        if ref.shape != got.shape:
            problems.append(f"key {key!r} has shape {got.shape}, {reference_name} has {ref.shape}")
        elif ref.dtype != got.dtype:
            problems.append(f"key {key!r} has dtype {got.dtype}, {reference_name} has {ref.dtype}")
    if problems:
        shown = "; ".join(sorted(problems)[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointMismatch(f"checkpoint {url}: {shown}. Every ingredient must be a fine-tune of the same pretrained model.")


def check_finite(name: str, tensor: torch.Tensor, url: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteCheckpoint(f"checkpoint {url}: tensor {name!r} holds NaN or Inf; it cannot enter a soup")


def name_non_finite(store: Store, ingredients: Sequence[Ingredient], name: str) -> None:
    """A sum came out NaN/Inf: name the checkpoint that holds it. Only this error path reads tensors again."""
    for ingredient in ingredients:
        with store.open_checkpoint(ingredient.url) as reader:
            check_finite(name, reader.tensor(name), ingredient.url)
    raise NonFiniteCheckpoint(f"tensor {name!r}: the sum over the ingredients overflowed; set soup.accumulate to float64")


def open_all(store: Store, ingredients: Sequence[Ingredient], stack: ExitStack,
             reference: Mapping[str, TensorInfo] | None = None, sequential: bool = False) -> list[CheckpointReader]:
    """Open every checkpoint and check its header against the reference before any tensor is read."""
    readers = [stack.enter_context(store.open_checkpoint(i.url, i.sha256, sequential)) for i in ingredients]
    reference = reference if reference is not None else readers[0].info
    for reader in readers:
        check_compatible(reference, reader.info, reader.url)
    return readers


def weighted_average(
    store: Store,
    ingredients: Sequence[Ingredient],
    weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    accumulate: torch.dtype = torch.float32,
    reference: Mapping[str, TensorInfo] | None = None,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """sum_i w_i * theta_i / sum_i w_i for every floating tensor, streamed; `weights` may differ per key.

    With equal weights this computes (theta_1 + ... + theta_k) / k in ingredient order, bit for bit
    what the greedy soup's running sum evaluates. The sums run on `device`; the soup comes back on the CPU.
    """
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    weights = [1.0] * len(ingredients) if weights is None else weights
    if store.protocol != "file":
        return _weighted_average_by_file(store, ingredients, weights, accumulate, reference, device)
    soup: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = open_all(store, ingredients, stack, reference)
        largest = max(info.end - info.begin for info in readers[0].info.values()) if readers[0].info else 0
        scratch = torch.empty(largest, dtype=torch.uint8)  # every read but the first of a tensor lands here
        for name, info in readers[0].info.items():
            if not info.dtype.is_floating_point:
                soup[name] = readers[0].tensor(name)
                continue
            key_weights = weights[name] if isinstance(weights, Mapping) else weights
            total = None
            for reader, weight in zip(readers, key_weights):
                tensor = reader.tensor(name, scratch if total is not None else None).to(device, non_blocking=True)
                term = tensor.to(accumulate) if weight == 1.0 else tensor.to(accumulate) * weight
                total = term if total is None else total.add_(term)
            soup[name] = finish(store, ingredients, name, total, key_weights, info)
    return soup


def finish(store: Store, ingredients: Sequence[Ingredient], name: str, total: torch.Tensor,
           key_weights: Sequence[float], info: TensorInfo) -> torch.Tensor:
    """A weighted sum becomes the soup's tensor: checked once (NaN and Inf survive a sum, so one check
    covers all N ingredients) and divided in place, so no second model-sized allocation builds up."""
    if not torch.isfinite(total).all():
        name_non_finite(store, ingredients, name)
    return total.div_(float(sum(key_weights))).to(info.dtype).cpu()


def _weighted_average_by_file(store, ingredients, weights, accumulate, reference, device) -> dict[str, torch.Tensor]:
    """The same sums, one checkpoint at a time read front to back: an object store serves few large
    sequential reads far better than one ranged request per tensor per checkpoint. Memory is the running
    sum (one model in the accumulation dtype) and one read buffer, whatever N is."""
    with ExitStack() as stack:  # every header is checked before any tensor is read (no sha256 yet: no extra read)
        unverified = [Ingredient(i.id, i.url) for i in ingredients]
        headers = [reader.info for reader in open_all(store, unverified, stack, reference)]
    total: dict[str, torch.Tensor] = {}
    for i, ingredient in enumerate(ingredients):
        with store.open_checkpoint(ingredient.url, ingredient.sha256, sequential=True) as reader:
            for name, info in headers[0].items():
                tensor = reader.tensor(name)
                if not info.dtype.is_floating_point:
                    total.setdefault(name, tensor)
                    continue
                weight = (weights[name] if isinstance(weights, Mapping) else weights)[i]
                term = tensor.to(device).to(accumulate) if weight == 1.0 else tensor.to(device).to(accumulate) * weight
                total[name] = term if i == 0 else total[name].add_(term)
    soup = {}
    for name, info in headers[0].items():
        value = total.pop(name)
        if info.dtype.is_floating_point:
            value = finish(store, ingredients, name, value, weights[name] if isinstance(weights, Mapping) else weights, info)
        soup[name] = value
    return soup


def add_into(total: dict[str, torch.Tensor], store: Store, ingredient: Ingredient,
             reference: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """A new running sum: `total` plus one more checkpoint (integer buffers kept from `total`)."""
    with ExitStack() as stack:
        (reader,) = open_all(store, [ingredient], stack, reference, sequential=True)
        out = {}
        for name, value in total.items():
            if value.is_floating_point():
                out[name] = value + reader.tensor(name).to(value.dtype)
                if not torch.isfinite(out[name]).all():
                    name_non_finite(store, [ingredient], name)
            else:
                out[name] = value
    return out


def load_accumulator(store: Store, ingredient: Ingredient, accumulate: torch.dtype = torch.float32,
                     reference: Mapping[str, TensorInfo] | None = None) -> dict[str, torch.Tensor]:
    with ExitStack() as stack:
        (reader,) = open_all(store, [ingredient], stack, reference, sequential=True)
        out = {}
        for name, tensor in reader.tensors():
            check_finite(name, tensor, reader.url)
            out[name] = tensor.to(accumulate) if tensor.is_floating_point() else tensor
    return out


def divide(total: dict[str, torch.Tensor], count: int, dtypes: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    return {name: (value / float(count)).to(dtypes[name].dtype) if value.is_floating_point() else value
            for name, value in total.items()}


def delta_cosines(store: Store, pretrained: Ingredient, ingredients: Sequence[Ingredient]) -> np.ndarray:
    """Pairwise cosine similarity of the fine-tune deltas theta_i - theta_0 (the paper's angle analysis)."""
    n = len(ingredients)
    gram = torch.zeros(n, n, dtype=torch.float64)
    with ExitStack() as stack:
        (base,) = open_all(store, [pretrained], stack)
        readers = open_all(store, ingredients, stack, base.info)
        for name, info in base.info.items():
            if not info.dtype.is_floating_point:
                continue
            theta0 = base.tensor(name).to(torch.float64).flatten()
            deltas = torch.stack([r.tensor(name).to(torch.float64).flatten() - theta0 for r in readers])
            gram += deltas @ deltas.T
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    return (gram / norms[:, None] / norms[None, :]).numpy()
