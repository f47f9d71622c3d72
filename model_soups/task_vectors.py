"""Merges of task vectors tau_i = theta_i - theta_0: WiSE-FT, task arithmetic, TIES-merging, DARE and Model Stock.

Every one is theta_0 + scale * combine(tau_1, ..., tau_N), computed one tensor at a time over all the
checkpoints (theta_0 loaded once, the ingredients open at once and read tensor by tensor):
- `mean` / `sum`: linear (WiSE-FT is the mean over a soup's ingredients, task arithmetic the sum);
- `ties`: sign election and disjoint mean (Yadav et al., NeurIPS 2023), after the TIES trim to the top-k%
  of each delta's entries by magnitude, or after DARE's drop;
- `drop` (DARE, Yu et al. 2023): each delta entry is dropped with probability p and the rest rescaled by
  1/(1-p), from a generator seeded by (seed, ingredient id, tensor name), so a merge is reproducible and
  does not depend on the order of the ingredients;
- `model_stock` (Jang et al., ECCV 2024): per tensor, t * mean(tau_i) with t = k cos / ((k-1) cos + 1), where
  cos is the angle between the k deltas: for k > 2 their mean pairwise cosine, as mergekit takes it. t is
  clamped to [0, 1]: deltas that disagree on average (cos <= 0) leave the tensor at theta_0.

The trim is per tensor, as mergekit does it, so that nothing needs a whole delta in memory. Peak memory:
the merged task vector and theta_0 (one model each, in the accumulation dtype) and, for one tensor at a
time, the N deltas of that tensor (`ties`) or one running sum (`mean`, `sum`): with N = 16 and the largest
tensor of all-MiniLM-L6-v2 (the 30522 x 384 embedding, 47 MB in float32), 750 MB on top of the models.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from typing import Mapping, Sequence

import torch

from model_soups.merge import Checkpoints, Ingredient, check_finite, open_all, weighted_sum
from model_soups.records import TaskMerge
from model_soups.storage import CorruptCheckpoint, TensorInfo


def dare_keep(shape: Sequence[int], drop: float, seed: int, ingredient: str, name: str) -> torch.Tensor:
    """DARE's mask for one tensor of one ingredient: True where the entry is kept (probability 1 - drop)."""
    digest = hashlib.sha256(f"{seed}/{ingredient}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64) >= drop


def trim(delta: torch.Tensor, top_k: float) -> torch.Tensor:
    """Keep the top_k % of entries by magnitude (at least one; entries tied with the last one kept stay too)."""
    keep = max(1, round(delta.numel() * top_k / 100))
    if keep >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def elect_and_mean(deltas: torch.Tensor) -> torch.Tensor:
    """TIES: per entry, the sign of the summed deltas, then the mean of the deltas that have that sign."""
    sign = torch.sign(deltas.sum(dim=0))
    agrees = (torch.sign(deltas) == sign) & (deltas != 0)
    count = agrees.sum(dim=0)
    return torch.where(count > 0, (deltas * agrees).sum(dim=0) / count.clamp_min(1), torch.zeros_like(sign))


def stock_ratio(cosine: float, k: int) -> float:
    """Model Stock's t: the weight of the fine-tunes' mean against theta_0 for k deltas at this mean cosine."""
    if cosine <= 0:
        return 0.0
    return min(1.0, k * cosine / ((k - 1) * cosine + 1))


def start(store: Checkpoints, pretrained: Ingredient | None, accumulate: torch.dtype,
          reference: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """theta_0, what every task-vector merge subtracts: the pretrained start in the accumulation dtype, checked
    against the reference and its sha256."""
    if pretrained is None:
        raise ValueError("a task-vector merge needs the pretrained start theta_0: the run has none. "
                         "Give the recipe a pretrained checkpoint, or cook only uniform, greedy and learned soups")
    try:
        return weighted_sum(store, [pretrained], None, accumulate, reference)
    except CorruptCheckpoint as error:
        raise CorruptCheckpoint(f"the pretrained start, which a task-vector merge subtracts, is unusable: {error}") from None


def task_vector(store: Checkpoints, theta0: Mapping[str, torch.Tensor], ingredients: Sequence[Ingredient], merge: TaskMerge,
                accumulate: torch.dtype, reference: Mapping[str, TensorInfo],
                stock: dict[str, tuple[float, float]] | None = None) -> dict[str, torch.Tensor]:
    """combine(tau_1..tau_N) for every floating tensor, in the accumulation dtype (see the module's docstring), and
    the first ingredient's integer and boolean buffers; `theta0` as `start` gives it. Every checkpoint's sha256
    is checked as it closes. `stock`, when given, receives Model Stock's (cos, t) of every tensor a fine-tune moved."""
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    if merge.combine == "model_stock" and len(ingredients) < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tunes (the angle between their deltas), the soup has "
                         f"{len(ingredients)}: fine-tune more (sweep.n >= 2), or drop model_stock from soup.methods")
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = open_all(store, ingredients, stack, reference)
        for name, info in reference.items():
            if not info.dtype.is_floating_point:
                out[name] = readers[0].tensor(name)  # integer and boolean buffers: the first ingredient's
                continue
            total, deltas, directions, still = None, [], None, []
            for ingredient, reader in zip(ingredients, readers):
                tensor = reader.tensor(name)
                check_finite(name, tensor, reader.url)
                delta = tensor.to(accumulate) - theta0[name]
                if merge.drop is not None:
                    delta = torch.where(dare_keep(info.shape, merge.drop, merge.seed, ingredient.id, name),
                                        delta / (1 - merge.drop), torch.zeros_like(delta))
                if merge.top_k is not None:
                    delta = trim(delta, merge.top_k)
                if merge.combine == "ties":
                    deltas.append(delta)
                    continue
                if merge.combine == "model_stock":  # the sum of unit deltas gives their mean pairwise cosine
                    norm = torch.linalg.vector_norm(delta)
                    if norm == 0:
                        still.append(ingredient.id)
                    else:
                        directions = delta / norm if directions is None else directions.add_(delta / norm)
                total = delta if total is None else total.add_(delta)
            if merge.combine == "ties":
                out[name] = elect_and_mean(torch.stack(deltas))
                del deltas
            elif merge.combine == "model_stock":
                out[name] = stock_merge(name, total, directions, still, len(ingredients), stock)
            else:
                out[name] = total / len(ingredients) if merge.combine == "mean" else total
    return out


def stock_merge(name: str, total: torch.Tensor, directions: torch.Tensor | None, still: list[str], k: int,
                stock: dict[str, tuple[float, float]] | None) -> torch.Tensor:
    """t * mean(tau_i) for one tensor, from the sum of its k deltas and the sum of their unit vectors:
    |sum u_i|^2 = k + 2 sum_{i<j} cos_ij, so the mean pairwise cosine needs no delta kept in memory."""
    if directions is None:  # no fine-tune moved this tensor (frozen): it stays theta_0, whatever t
        return torch.zeros_like(total)
    if still:
        raise ValueError(f"Model Stock: tensor {name!r} of ingredient {still[0]} equals the pretrained start while "
                         "other fine-tunes moved it, so the angle between their deltas is undefined. Leave that "
                         "ingredient out of the sweep, or drop model_stock from soup.methods")
    cosine = ((torch.linalg.vector_norm(directions) ** 2 - k) / (k * (k - 1))).item()
    t = stock_ratio(cosine, k)
    if stock is not None:
        stock[name] = (cosine, t)
    return total * (t / k)


def apply(theta0: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], scale: float,
          reference: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """theta_0 + scale * tau in each tensor's own dtype (theta_0 and tau in the accumulation dtype); integer and
    boolean buffers as `task_vector` gives them."""
    return {name: (theta0[name] + scale * tau[name]).to(info.dtype) if info.dtype.is_floating_point else tau[name]
            for name, info in reference.items()}
