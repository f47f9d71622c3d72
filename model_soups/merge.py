"""Weighted averages of checkpoints, a tensor or a block at a time, so memory does not grow with N.

Rules (DESIGN.md): every checkpoint has the pretrained keys, shapes and dtypes; floating tensors are
accumulated in float32 or float64 and written back in their own dtype; integer and boolean buffers come
from the first ingredient; a NaN or Inf rejects the checkpoint.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import ContextManager, Mapping, Protocol, Sequence

import numpy as np
import torch

from model_soups.storage import MappedCheckpoint, TensorInfo


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


class Reader(Protocol):
    """One open checkpoint: its header (`info`), then tensors by name. A `CheckpointReader` streams one front to
    back; a `MappedCheckpoint` (a local file) and a `pantry.Held` (in memory) are read anywhere, in place (`view`)."""

    url: str
    info: Mapping[str, TensorInfo]

    def tensor(self, name: str, scratch: torch.Tensor | None = None) -> torch.Tensor: ...

    def view(self, name: str) -> torch.Tensor: ...  # readers that do not stream: in place, never changed


class Checkpoints(Protocol):
    """Where soups open checkpoints: a `Store`, or a cooking run's `Pantry` (each checkpoint read and checked once)."""

    def open_checkpoint(self, url: str, sha256: str | None = None, sequential: bool = False) -> ContextManager[Reader]: ...

    def streamed(self, url: str) -> bool: ...  # whether its reader streams front to back (an object store)


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


def name_non_finite(store: Checkpoints, ingredients: Sequence[Ingredient], name: str) -> None:
    """A sum came out NaN/Inf: name the checkpoint that holds it. Only this error path reads tensors again."""
    for ingredient in ingredients:
        with store.open_checkpoint(ingredient.url) as reader:
            check_finite(name, reader.tensor(name), ingredient.url)
    raise NonFiniteCheckpoint(f"tensor {name!r}: the sum over the ingredients overflowed; set soup.accumulate to float64")


def open_all(store: Checkpoints, ingredients: Sequence[Ingredient], stack: ExitStack,
             reference: Mapping[str, TensorInfo] | None = None, sequential: bool = False) -> list[Reader]:
    """Open every checkpoint and check its header against the reference before any tensor is read. A reader whose
    header equals the reference's holds the reference instead of its own copy: N fine-tunes of one model keep one
    header in memory, not N (64 copies of a 65-tensor header held 1.2 MB, 15% of an 8 MB soup)."""
    readers = []
    for ingredient in ingredients:
        reader = stack.enter_context(store.open_checkpoint(ingredient.url, ingredient.sha256, sequential))
        reference = reference if reference is not None else reader.info
        check_compatible(reference, reader.info, reader.url)
        if reader.info == reference:
            reader.info = reference
        readers.append(reader)
    return readers


Weights = Sequence[float] | Mapping[str, Sequence[float]]


def weight_of(weights: Weights, name: str) -> Sequence[float]:
    return weights[name] if isinstance(weights, Mapping) else weights


def weighted_sum(store: Checkpoints, ingredients: Sequence[Ingredient], weights: Weights | None = None,
                 accumulate: torch.dtype = torch.float32, reference: Mapping[str, TensorInfo] | None = None,
                 onto: Mapping[str, torch.Tensor] | None = None, device: str = "cpu",
                 average: bool = False) -> dict[str, torch.Tensor]:
    """sum_i w_i * theta_i for every floating tensor, in the accumulation dtype, added onto the running sum `onto`
    (left unchanged) when given. Integer and boolean buffers come from `onto`, else from the first ingredient.
    `average` divides each sum by the total of its weights, into the checkpoint's dtype on the CPU (`mean_of`).

    The one weighted sum every soup uses; memory is the sum (one model in the accumulation dtype), whatever N is.
    Checkpoints in memory or in local files are summed side by side, a block at a time (`side_by_side`). Streamed
    ones (an object store) are read one after the other, front to back (`one_after_another`): an object store
    serves few large sequential reads far better than one ranged request per tensor per checkpoint. Both add the
    same terms in the same order: the sums are the same, bit for bit.
    """
    weights = [1.0] * len(ingredients) if weights is None else weights
    streamed = any(store.streamed(ingredient.url) for ingredient in ingredients)
    if streamed:
        with ExitStack() as stack:  # every header is checked before any tensor is read (no sha256 yet: no extra read)
            header = open_all(store, [Ingredient(i.id, i.url) for i in ingredients], stack, reference)[0].info
        total, non_finite = one_after_another(store, ingredients, header, weights, accumulate, onto, device)
    else:
        with ExitStack() as stack:  # every header is checked before any tensor is read; each sha256 as its reader closes
            readers = open_all(store, ingredients, stack, reference)
            header = readers[0].info
            total, non_finite = side_by_side(readers, header, weights, accumulate, onto, device, average)
    if non_finite:  # NaN and Inf survive a sum: one check of the sums covers every ingredient
        name_non_finite(store, ingredients, non_finite[0])
    if average and streamed:  # popped one by one and divided in place: the sums and the soup never both exist in full
        return {name: mean_of(total.pop(name), float(sum(weight_of(weights, name))), info.dtype, in_place=True)
                for name, info in header.items()}
    return total


def term_of(tensor: torch.Tensor, weight: float, accumulate: torch.dtype, device: str,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """w_i * theta_i in the accumulation dtype on `device`: the tensor itself when that changes nothing (never summed
    in place); else a new tensor, or `out` when given (a buffer of its size, reused block after block)."""
    if out is None:
        term = tensor.to(device).to(accumulate)
        return term if weight == 1.0 else term * weight
    if tensor.dtype == accumulate and tensor.device == out.device and weight == 1.0:
        return tensor
    out.copy_(tensor)
    return out if weight == 1.0 else out.mul_(weight)


def one_after_another(store: Checkpoints, ingredients: Sequence[Ingredient], header: Mapping[str, TensorInfo],
                      weights: Weights, accumulate: torch.dtype, onto: Mapping[str, torch.Tensor] | None,
                      device: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The sums, reading one checkpoint at a time front to back; and the names of those that came out NaN or Inf."""
    total = dict(onto or {})
    owned: set[str] = set()  # sums this call allocated, so they may be added to in place
    for i, ingredient in enumerate(ingredients):
        with store.open_checkpoint(ingredient.url, ingredient.sha256, sequential=True) as reader:
            for name, info in header.items():
                tensor = reader.tensor(name)
                if not info.dtype.is_floating_point:
                    total.setdefault(name, tensor)
                    continue
                term = term_of(tensor, weight_of(weights, name)[i], accumulate, device)
                if name in owned:
                    total[name].add_(term)
                else:  # a held tensor (`Pantry`) comes back as the term itself: summed into a copy, never in place
                    total[name] = (term.clone() if term is tensor else term) if name not in total else total[name] + term
                    owned.add(name)
    return total, [name for name in owned if not torch.isfinite(total[name]).all()]


BLOCK = 1 << 20  # elements summed side by side at a time: a block stays in cache while every ingredient is added


def side_by_side(readers: Sequence[Reader], header: Mapping[str, TensorInfo], weights: Weights,
                 accumulate: torch.dtype, onto: Mapping[str, torch.Tensor] | None, device: str,
                 average: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The sums (or with `average`, the means in the checkpoint's dtype), a block of elements at a time across every
    checkpoint, where they lie (the page cache of a mapped file, or memory): each input byte is read once and each
    result written once, with no copy in between, and looked at for NaN and Inf while it is in cache. Tensors that
    lie back to back in every mapped file are summed as one block of memory, so that small tensors cost no more than
    large ones. Also returns the names of the results that came out NaN or Inf."""
    total = dict(onto or {})
    non_finite: list[str] = []
    for names in runs(readers, header, weights, onto is None):
        first, last = names[0], names[-1]
        if not header[first].dtype.is_floating_point:
            total.setdefault(first, readers[0].tensor(first))
            continue
        sources = [r.view(first).reshape(-1) if first == last else r.span(first, last) for r in readers]
        start = onto[first].reshape(-1) if onto is not None and first in onto else None
        factors = weight_of(weights, first)
        numel = sources[0].numel()
        if average:  # the mean of each block, divided while in cache, as `mean_of` divides a whole sum
            out, divisor = torch.empty(numel, dtype=header[first].dtype), float(sum(factors))
            scratch = (out if out.dtype == accumulate and device == "cpu"
                       else torch.empty(min(BLOCK, numel), dtype=accumulate, device=device))
        else:
            out = scratch = torch.empty(numel, dtype=accumulate, device=device)
        # the terms that are not the mapped bytes themselves are made in one buffer: nothing is allocated per block
        converted = any(factor != 1.0 for factor in factors) or header[first].dtype != accumulate or device != "cpu"
        terms = torch.empty(min(BLOCK, numel), dtype=accumulate, device=device) if converted else None
        sums = []  # of each block: NaN or Inf in any element makes it NaN or Inf (as may an overflow, checked exactly)
        for begin in range(0, numel, BLOCK):
            end = min(begin + BLOCK, numel)
            block = scratch[begin:end] if scratch is out else scratch[:end - begin]
            for i, source in enumerate(sources):
                term = term_of(source[begin:end], factors[i], accumulate, device,
                               None if terms is None else terms[:end - begin])
                if i > 0:
                    block.add_(term)
                elif start is not None:
                    torch.add(start[begin:end], term, out=block)
                else:
                    block.copy_(term)
            if average:
                block.div_(divisor)
                if scratch is not out:
                    out[begin:end].copy_(block)
            sums.append(out[begin:end].sum())
        offset = 0
        for name in names:
            numel = math.prod(header[name].shape)
            total[name] = out[offset:offset + numel].view(header[name].shape)
            offset += numel
        if sums and not torch.isfinite(torch.stack(sums)).all():
            non_finite += [name for name in names if not torch.isfinite(total[name]).all()]
    return total, non_finite


def runs(readers: Sequence[Reader], header: Mapping[str, TensorInfo], weights: Weights, spans: bool) -> list[list[str]]:
    """The names in file order, grouped into what `side_by_side` sums as one block: floating tensors of one dtype and
    one weight each that lie back to back in every reader, when all are mapped files (`spans`); else one name each."""
    spans = spans and all(isinstance(reader, MappedCheckpoint) for reader in readers)
    groups: list[list[str]] = []
    for name, info in header.items():
        previous = groups[-1][-1] if groups else None
        if (spans and previous is not None and info.dtype.is_floating_point and info.dtype == header[previous].dtype
                and list(weight_of(weights, name)) == list(weight_of(weights, previous))
                and all(reader.info[previous].end == reader.info[name].begin for reader in readers)):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def mean_of(value: torch.Tensor, divisor: float, dtype: torch.dtype, in_place: bool = False) -> torch.Tensor:
    """A sum divided into the soup's tensor, in the checkpoint's own dtype, on the CPU. `in_place` divides the
    sum itself (no second allocation of the tensor); the greedy soup keeps its running sum, so it does not."""
    if not dtype.is_floating_point:
        return value
    return (value.div_(divisor) if in_place else value / divisor).to(dtype).cpu()


def weighted_average(store: Checkpoints, ingredients: Sequence[Ingredient], weights: Weights | None = None,
                     accumulate: torch.dtype = torch.float32, reference: Mapping[str, TensorInfo] | None = None,
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """sum_i w_i * theta_i / sum_i w_i, streamed; `weights` may differ per key.

    With equal weights this computes (theta_1 + ... + theta_k) / k in ingredient order, bit for bit what the
    greedy soup's running sum evaluates. The sums run on `device`; the soup comes back on the CPU.
    """
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    weights = [1.0] * len(ingredients) if weights is None else weights
    if reference is None:  # the pipeline passes the pretrained header; alone, the first ingredient's is the reference
        with ExitStack() as stack:
            reference = open_all(store, ingredients[:1], stack)[0].info
    soup = weighted_sum(store, ingredients, weights, accumulate, reference, device=device, average=True)
    return {name: soup[name] for name in reference}


def delta_cosines(store: Checkpoints, pretrained: Ingredient, ingredients: Sequence[Ingredient]) -> np.ndarray:
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
