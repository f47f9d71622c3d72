"""The digits recipe with real faults injected into chosen fine-tunes, for the fault tests.

`faults` maps a sweep seed to what its fine-tune does at its first training step:
- crash: SIGKILL itself, as the kernel's out-of-memory killer would;
- crash-once: the same, but only on the first attempt (a marker file in `marker_dir` remembers it);
- hang: sleep far past any timeout;
- oom: cap its own address space 1 GiB above what it uses, then grow activations until allocation fails;
- nan: make the logits NaN, so the loss diverges.
The fault fires only in the fine-tune process: only there is the model in training mode under that seed.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from model_soups.recipes.digits import Digits, DigitsOptions

Fault = Literal["crash", "crash-once", "hang", "oom", "nan"]


class FaultyOptions(DigitsOptions):
    faults: dict[int, Fault] = Field(default_factory=dict)
    marker_dir: str = ""


class FaultyDigits(Digits):
    name = "faulty-digits"
    Options = FaultyOptions

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        fault = self.options.faults.get(torch.initial_seed())  # train.finetune seeds torch with the sweep seed
        if fault is not None:
            model.register_forward_hook(lambda module, inputs, output: inject(fault, module, output, self.options.marker_dir))
        return model


def inject(fault: Fault, module: torch.nn.Module, output: torch.Tensor, marker_dir: str) -> torch.Tensor:
    if not module.training:
        return output
    if fault == "crash-once":
        marker = Path(marker_dir) / f"crashed-{torch.initial_seed()}"
        if marker.exists():
            return output
        marker.touch()
        fault = "crash"
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    if fault == "oom":
        in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (in_use + (1 << 30), resource.RLIM_INFINITY))
        activations = []
        while True:
            activations.append(torch.ones(64 << 20, dtype=torch.uint8))
    return output * float("nan")
