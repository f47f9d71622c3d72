"""The embedded default: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans).

Pretraining mirrors the paper's setting on a small scale. A small CNN is first trained on another task,
predicting which of four rotations an image was given (no digit labels), and then a 10-way head is fitted
on its frozen features (a linear probe). That network is the one shared starting point. Ingredients
fine-tune all of it on digit classification. The distribution shifts are test images that were rotated,
blurred with noise added, or drawn with thicker strokes.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from torch import nn

from model_soups.recipes import Recipe, SplitData, register_recipe, stable_hash

OOD_SHIFTS = ("rotate", "noise", "thick")


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    val_size: int = Field(300, ge=10, description="held out from train, used only to choose")
    test_size: int = Field(450, ge=10)
    ood: list[str] = Field(list(OOD_SHIFTS), description=f"distribution shifts, from {', '.join(OOD_SHIFTS)}")
    pretrain_epochs: int = Field(12, ge=1)
    width: int = Field(32, ge=4, description="channels of the first conv layer")
    split_seed: int = 0


class DigitsNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.backbone = nn.Sequential(
            *block(1, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@register_recipe
class Digits(Recipe):
    name = "digits"
    Options = DigitsOptions
    default_search = {
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "weight_decay": {"low": 1e-4, "high": 0.1, "log": True},
        "epochs": [10, 15, 20],
        "label_smoothing": [0.0, 0.1],
        "mixup": [0.0, 0.2],
        "augment": [0.0, 0.5, 1.0],
        "seed": list(range(8)),
    }

    def __init__(self, options=None):
        super().__init__(options)
        unknown = set(self.options.ood) - set(OOD_SHIFTS)
        if unknown:
            from model_soups.config import ConfigError

            raise ConfigError(f"recipe.options.ood: unknown shift(s) {sorted(unknown)}; choose from {', '.join(OOD_SHIFTS)}")

    @cached_property
    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(self.options.split_seed).permutation(len(labels))
        n_test, n_val = self.options.test_size, self.options.val_size
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        arrays = {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                  "test": (images[test], labels[test])}
        rng = np.random.default_rng(1234)
        for shift in self.options.ood:
            arrays[f"ood:{shift}"] = (_shift(images[test], shift, rng), labels[test])
        return arrays

    def data_fingerprint(self) -> str:
        return stable_hash({split: stable_hash(x.tobytes().hex() + y.tobytes().hex()) for split, (x, y) in self._arrays.items()})

    def splits(self) -> list[str]:
        return ["val", "test"] + [f"ood:{shift}" for shift in self.options.ood]

    def build_model(self) -> nn.Module:
        return DigitsNet(self.options.width)

    def load_split(self, split: str) -> SplitData:
        self.check_split(split)
        images, labels = self._arrays[split]
        return SplitData({"x": torch.from_numpy(images).unsqueeze(1)}, torch.from_numpy(labels))

    def augment(self, inputs, strength, generator):
        x = inputs["x"]
        n = x.shape[0]
        angle = (torch.rand(n, generator=generator) * 2 - 1) * (15.0 * strength) * torch.pi / 180
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (strength * 2 / x.shape[-1])
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return {"x": F.grid_sample(x, grid.to(x.dtype), align_corners=False, padding_mode="zeros")}

    def make_pretrained(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model = DigitsNet(self.options.width, classes=4)  # the pretext task: which rotation was applied
        x = self.load_split("train").inputs["x"]
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        targets = torch.arange(4).repeat_interleave(len(x))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        for _ in range(self.options.pretrain_epochs):
            for index in torch.randperm(len(rotated), generator=generator).split(128):
                loss = F.cross_entropy(model(rotated[index]), targets[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        train = self.load_split("train")
        with torch.no_grad():
            features = model.backbone(train.inputs["x"])
        head = nn.Linear(features.shape[1], 10)
        probe = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(300):
            loss = F.cross_entropy(head(features), train.labels)
            probe.zero_grad()
            loss.backward()
            probe.step()
        model.head = head
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _shift(images: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        if shift == "rotate":
            angle = rng.uniform(20, 35) * rng.choice([-1, 1])
            out[i] = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant")
        elif shift == "noise":
            out[i] = ndimage.gaussian_filter(image, 0.6) + rng.normal(0, 0.2, image.shape)
        else:  # thick
            out[i] = ndimage.grey_dilation(image, size=(2, 2))
    return np.clip(out, 0, 1).astype(np.float32)
