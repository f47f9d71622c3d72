"""Fine-tunes as supervised processes, one per device slot: a crash, hang or out-of-memory ends one
ingredient, never the run, and gives back the device's memory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from typing import Callable

import torch

from model_soups.records import BUSY_EXIT_CODE, STORAGE_EXIT_CODE, DeviceSlot, FinetuneJob
from model_soups.storage import StorageUnavailable

OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|out of memory|can't allocate memory|not enough memory|MemoryError")


class IngredientBusy(RuntimeError):
    """Another process holds the ingredient's lease."""


class FinetuneFailed(RuntimeError):
    """A fine-tune process crashed, hung past its timeout or ran out of memory; `reason` says which, in one line."""

    def __init__(self, ingredient_id: str, reason: str, output: str = ""):
        super().__init__(f"ingredient {ingredient_id}: {reason}" + (f"\n{output}" if output else ""))
        self.reason = reason


def device_slots(setting: int | str) -> list[DeviceSlot]:
    """One slot per parallel fine-tune: a CUDA device each, or a CPU slot with one thread each."""
    gpus = torch.cuda.device_count()
    count = (gpus or len(os.sched_getaffinity(0))) if setting == "auto" else int(setting)
    if gpus:
        return [DeviceSlot(name=f"cuda:{i % gpus}", env={"CUDA_VISIBLE_DEVICES": str(i % gpus)}) for i in range(count)]
    return [DeviceSlot(name=f"cpu:{i}", env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            for i in range(count)]


def this_device() -> str:
    """Where this process computes (trains, evaluates, cooks): the CUDA device its slot left visible, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def this_process_slot() -> DeviceSlot:
    """The slot a worker was pinned to when it started (SOUP_SLOT names it); its environment is inherited."""
    device = os.environ.get("CUDA_VISIBLE_DEVICES")
    return DeviceSlot(name=os.environ.get("SOUP_SLOT") or f"{socket.gethostname()}:{'cuda ' + device if device else 'cpu'}")


def run_finetune_process(job: FinetuneJob, slot: DeviceSlot, timeout_s: float, log: Callable[[str], None]) -> None:
    """Run `python -m model_soups.train` on one device slot; raise with its last output if it fails."""
    env = {**os.environ, **slot.env}
    process = subprocess.Popen([sys.executable, "-m", "model_soups.train"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = threading.Event()
    timer = threading.Timer(timeout_s, lambda: (killed.set(), process.kill()))
    timer.start()
    tail: deque[str] = deque(maxlen=15)
    try:
        process.stdin.write(job.to_stdin())  # credentials travel over stdin, never on the command line
        process.stdin.close()
        for line in process.stdout:
            tail.append(line.rstrip())
            if line.startswith(("step ", job.id)):
                log(f"{job.id} [{slot.name}] {line.rstrip()}")
        code = process.wait()
    finally:
        timer.cancel()
    output = "\n".join(tail)
    last = next((line for line in reversed(tail) if line.strip()), "no output")
    if killed.is_set():
        reason = f"hung: still running after execution.timeout_s={timeout_s:g}s on {slot.name}, killed"
        raise FinetuneFailed(job.id, reason, output)
    if code == BUSY_EXIT_CODE:
        raise IngredientBusy(job.id)
    if code == STORAGE_EXIT_CODE:
        raise StorageUnavailable(last)
    if code < 0:
        name = signal.Signals(-code).name
        cause = " (the kernel's out-of-memory killer, or someone stopped it)" if -code == signal.SIGKILL else ""
        raise FinetuneFailed(job.id, f"crashed: killed by {name}{cause} on {slot.name}", output)
    if code != 0:
        kind = "out of memory" if OUT_OF_MEMORY.search(output) else f"crashed: exit code {code}"
        raise FinetuneFailed(job.id, f"{kind} on {slot.name}: {last}", output)
