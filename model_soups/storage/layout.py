"""Where each artifact of one experiment lives (DESIGN.md, storage layout): every storage path, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model_soups.storage.store import Store


def split_file(split: str, suffix: str) -> str:
    """`ood:noise` becomes `ood_noise.json`: a colon is not welcome in every object store's keys."""
    return f"{split.replace(':', '_')}.{suffix}"


class Layout:
    def __init__(self, store: Store, experiment: str):
        self.store, self.experiment = store, experiment

    def pretrained(self, fingerprint: str) -> str:
        return self.store.url(self.experiment, "pretrained", f"{fingerprint}.safetensors")

    def pretrained_record(self, fingerprint: str) -> str:
        return self.store.url(self.experiment, "pretrained", f"{fingerprint}.json")

    def checkpoint(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "model.safetensors")

    def lease(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "lease.json")

    def meta(self, ingredient_id: str) -> str:
        return self.store.url(self.experiment, "ingredients", ingredient_id, "meta.json")

    def evaluation(self, ingredient_id: str, split: str, suffix: str) -> str:
        """`suffix` json: the metrics; npz: the logits and labels."""
        return self.store.url(self.experiment, "evals", ingredient_id, split_file(split, suffix))

    def soup(self, key: str) -> str:
        return self.store.url(self.experiment, "soups", key, "soup.safetensors")

    def soup_record(self, key: str) -> str:
        return self.store.url(self.experiment, "soups", key, "record.json")

    def soup_logits(self, key: str, split: str) -> str:
        return self.store.url(self.experiment, "soups", key, split_file(split, "npz"))

    def cooked(self, run_id: str) -> str:
        """What a run's cooking on the device pool made (`Cooked`), for the run that waits on it."""
        return self.store.url(self.experiment, "cooked", f"{run_id}.json")

    def sweep_round(self, sweep: str, index: int) -> str:
        """A soup-aware sweep's round: its proposals, then what each added to the greedy soup."""
        return self.store.url(self.experiment, "sweeps", sweep, f"round-{index:03d}.json")

    def runs(self) -> str:
        return self.store.url(self.experiment, "runs")

    def run(self, run_id: str) -> "RunFolder":
        return RunFolder(f"{self.runs()}/{run_id}")


class RunFolder:
    """The files of one published run; `soup report RUN_URL` opens one from its URL alone."""

    FILES = ("soup.safetensors", "results.csv", "results.parquet", "cosine.json")

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def file(self, name: str) -> str:
        return f"{self.url}/{name}"

    def figure(self, name: str) -> str:
        return f"{self.url}/figures/{name}.png"

    @property
    def soup(self) -> str:
        return self.file("soup.safetensors")

    @property
    def manifest(self) -> str:
        return self.file("manifest.json")

    @property
    def run_id(self) -> str:
        return self.url.rsplit("/", 1)[1]

    def paths(self, store: Store) -> dict[str, str]:
        """What the published folder offers, by name: itself, the soup, the report, and `hf/` where it was exported."""
        paths = {"run": self.url, "soup": self.soup, "report.md": self.file("report.md"),
                 "report.html": self.file("report.html")}
        return {**paths, "hf": self.file("hf")} if store.exists(self.file("hf")) else paths
