"""The embedded default: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans), in the paper's regime.

The paper's soups win when every fine-tune starts from one strong, robust pretrained model that already
has a usable head, and stays in its basin. This recipe builds that start offline, on a small scale:

- **Pretraining on another distribution of the same classes** (the analogue of CLIP's web images): printed
  digits rendered from the 20 fonts matplotlib ships (DejaVu, STIX, Computer Modern; upright, bold,
  italic, mono, serif, old-style figures), each with a random size, aspect, rotation, shear, stroke width
  and offset, rasterised at 32x32 and counted in 4x4 blocks, which is how the 8x8 scans of `load_digits`
  were made, plus sensor noise. Its 10-way head reads handwritten digits zero-shot.
- **An LP-FT start** (`head: linear-probe`, the default): that head is then refitted on the frozen features
  of the handwritten training images, starting from the zero-shot head. Every ingredient fine-tunes the
  whole network from there. `head: zero-shot` keeps the printed-digit head instead.
- **GroupNorm**, which has no running statistics: the average of the weights is the whole model, so a
  soup needs no BatchNorm re-estimation. `norm: batch` is kept to show (and test) that case.
- **A sweep inside the basin**: small learning rates and short runs; diversity comes from augmentation,
  mixup, label smoothing, weight decay and the seed (data order and mixup draws).
- **A large val**: 600 images (one image is 0.17 points), since val is what chooses the soup.

The distribution shifts are the test images rotated 20-35 degrees, blurred with noise added, or drawn with
thicker strokes.
"""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from model_soups.recipes.base import Recipe, SplitData, fit_linear_probe, stable_hash
from model_soups.recipes.options import OOD_SHIFTS, DigitsOptions
from model_soups.validation import ConfigError

FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
         "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
         "cmr10", "cmss10", "cmtt10", "cmb10", "cmti10", "cmmi10")


class DigitsNet(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10, norm: str = "group", dtype: torch.dtype = torch.float32):
        super().__init__()
        made = {"dtype": dtype}  # drawn in this dtype: a float64 net drawn in float32 would start CPU-dependent

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            normalise = (nn.GroupNorm(min(8, c_out // 2), c_out, **made) if norm == "group" else
                         nn.BatchNorm2d(c_out, **made))
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, **made), normalise, nn.ReLU()]

        self.backbone = nn.Sequential(
            *block(1, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes, **made)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Digits(Recipe):
    """The embedded default: scikit-learn's handwritten digits, from a start pretrained on printed digits."""

    name = "digits"
    Options = DigitsOptions
    default_search = {
        "lr": {"low": 1e-4, "high": 5e-4, "log": True},
        "weight_decay": [0.0, 0.01, 0.1],
        "epochs": [12, 16, 20],
        "batch_size": [32],
        "label_smoothing": [0.0, 0.1],
        "mixup": [0.0, 0.2],
        "augment": [0.0, 0.5, 1.0],
        "seed": list(range(16)),
    }

    def __init__(self, options=None):
        super().__init__(options)
        unknown = set(self.options.ood) - set(OOD_SHIFTS)
        if unknown:
            raise ConfigError(f"recipe.options.ood: unknown shift(s) {sorted(unknown)}; choose from {', '.join(OOD_SHIFTS)}")

    @cached_property
    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(self.options.split_seed).permutation(len(labels))
        n_test, n_val = self.options.test_size, self.options.val_size
        if n_test + n_val > len(labels) - 100:
            raise ConfigError(f"recipe.options: test_size + val_size = {n_test + n_val} leaves fewer than 100 of the "
                              f"{len(labels)} digits to train on; lower them")
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        arrays = {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                  "test": (images[test], labels[test])}
        rng = np.random.default_rng(1234)
        for shift in self.options.ood:
            arrays[f"ood:{shift}"] = (_shift(images[test], shift, rng), labels[test])
        return arrays

    def describe(self):
        described = super().describe()
        if self.options.dtype == "float32":  # as before `dtype` existed, so starts and fine-tunes stored then are found
            del described["options"]["dtype"]
        return described

    def data_fingerprint(self) -> str:
        return stable_hash({split: stable_hash(x.tobytes().hex() + y.tobytes().hex()) for split, (x, y) in self._arrays.items()})

    def splits(self) -> list[str]:
        return ["val", "test"] + [f"ood:{shift}" for shift in self.options.ood]

    def build_model(self) -> nn.Module:
        return DigitsNet(self.options.width, norm=self.options.norm, dtype=self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.options.dtype)

    def load_split(self, split: str) -> SplitData:
        self.check_split(split)
        images, labels = self._arrays[split]
        return SplitData({"x": torch.from_numpy(images).unsqueeze(1).to(self._dtype)}, torch.from_numpy(labels))

    def augment(self, inputs, strength, generator):
        x = inputs["x"]
        n = x.shape[0]
        angle = (torch.rand(n, generator=generator, dtype=x.dtype) * 2 - 1) * (15.0 * strength) * torch.pi / 180
        shift = (torch.rand(n, 2, generator=generator, dtype=x.dtype) * 2 - 1) * (strength * 2 / x.shape[-1])
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return {"x": F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")}

    def make_pretrained(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        images, labels = printed_digits(self.options.pretrain_examples, np.random.default_rng(0))
        x, y = torch.from_numpy(images).unsqueeze(1).to(self._dtype), torch.from_numpy(labels)
        model = self.build_model()
        steps = self.options.pretrain_epochs * -(-len(x) // 128)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        model.train()
        for _ in range(self.options.pretrain_epochs):
            for index in torch.randperm(len(x), generator=generator).split(128):
                loss = F.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        if self.options.head == "linear-probe":  # from the zero-shot head
            train = self.load_split("train")
            with torch.no_grad():
                features = model.backbone(train.inputs["x"])
            fit_linear_probe(model.head, features, train.labels, steps=200)
        return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _font_path(name: str) -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", f"{name}.ttf")


def printed_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` printed digits as 8x8 images in [0, 1], cycling through fonts and digits, each randomly jittered."""
    from matplotlib.ft2font import FT2Font, LoadFlags

    glyphs = []
    for name in FONTS:
        font = FT2Font(_font_path(name))
        font.set_size(48, 72)
        for digit in range(10):
            font.set_text(str(digit), 0.0, flags=LoadFlags.DEFAULT)
            font.draw_glyphs_to_bitmap(antialiased=True)
            bitmap = np.asarray(font.get_image(), dtype=np.float32) / 255
            rows, cols = np.nonzero(bitmap > 0.5)
            glyphs.append((bitmap[rows.min():rows.max() + 1, cols.min():cols.max() + 1], digit))
    images = np.empty((n, 8, 8), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        glyph, labels[i] = glyphs[i % len(glyphs)]
        images[i] = _jitter(glyph, rng)
    return images, labels


def _jitter(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale, stretch, rotate, shear and shift a glyph into a 32x32 bitmap, vary its stroke, count 4x4 blocks."""
    height, width = glyph.shape
    scale = rng.uniform(24, 32) / height
    angle, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.25, 0.25)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    to_output = rotation @ np.array([[1, 0], [shear, 1]]) @ np.diag([scale, scale * rng.uniform(0.8, 1.5)])
    to_glyph = np.linalg.inv(to_output)
    centre = np.array([16.0, 16.0]) + rng.uniform(-1.5, 1.5, 2)
    drawn = ndimage.affine_transform(glyph, to_glyph, offset=np.array([height, width]) / 2 - to_glyph @ centre,
                                     output_shape=(32, 32), order=1) > 0.5
    stroke = int(rng.integers(-1, 3))
    if stroke > 0:
        drawn = ndimage.binary_dilation(drawn, iterations=stroke)
    elif stroke < 0 and ndimage.binary_erosion(drawn).sum() > 20:
        drawn = ndimage.binary_erosion(drawn)
    image = drawn.reshape(8, 4, 8, 4).sum(axis=(1, 3)) / 16.0
    return np.clip(image + rng.normal(0, rng.uniform(0, 0.08), image.shape), 0, 1)


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
