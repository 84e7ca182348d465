"""The study's raw results as the report reads them: one JSON per finished run (written
by :mod:`tst_titan.analysis.study.runner`) plus ``validation_clusters.json``, the source
file of each held-out sequence (for clustered standard errors)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tst_titan.analysis.stats import cluster_jackknife_se
from tst_titan.data import pycorpus
from tst_titan.data.store import TokenStore

CLUSTERS_FILE = "validation_clusters.json"


@dataclass
class RunResult:
    """One finished run."""

    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.raw["spec"]

    size = property(lambda self: self.spec["size"])
    arm = property(lambda self: self.spec["arm"])
    steps = property(lambda self: int(self.spec["steps"]))
    seed = property(lambda self: int(self.spec["seed"]))
    group = property(lambda self: self.spec["group"])
    final_loss = property(lambda self: float(self.raw["final_loss"]))
    params = property(lambda self: int(self.raw["params"]))
    params_non_embedding = property(lambda self: int(self.raw["params_non_embedding"]))

    @property
    def sequence_losses(self) -> np.ndarray | None:
        seq = self.raw.get("final_sequence_losses")
        return None if seq is None else np.asarray(seq, dtype=np.float64)

    @property
    def data_tokens(self) -> float:
        return float(self.raw["data_tokens"][-1][1]) if self.raw["data_tokens"] else math.nan

    @property
    def wall_seconds(self) -> float:
        """Training time of all attempts (start-up and validation included)."""
        return sum(a.get("end", a["start"]) - a["start"] for a in self.raw["attempts"])

    @property
    def spans(self) -> list[tuple[float, float]]:
        return [(a["start"], a.get("end", a["start"])) for a in self.raw["attempts"]]

    def se(self, clusters: np.ndarray | None) -> float:
        """Standard error of the final loss, a delete-one-source-file jackknife when the
        clusters are known (else the validator's i.i.d. one)."""
        seq = self.sequence_losses
        if clusters is not None and seq is not None and len(seq) == len(clusters):
            return cluster_jackknife_se(seq, clusters)
        se = self.raw["val"][-1][2]
        return math.nan if se is None else float(se)


def load_results(results_dir: Path) -> dict[str, RunResult]:
    out = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        if f.name == CLUSTERS_FILE:
            continue
        r = RunResult(json.loads(f.read_text()))
        out[r.name] = r
    return out


def load_clusters(results_dir: Path) -> np.ndarray | None:
    f = Path(results_dir) / CLUSTERS_FILE
    return np.asarray(json.loads(f.read_text())["cluster_of_sequence"]) if f.is_file() else None


def validation_clusters(store_path: str, packages: tuple[str, ...] | None, window: int,
                        num_sequences: int) -> dict[str, Any]:
    """The source file of each held-out sequence of a python_env validation store, read
    unshuffled in windows of ``window`` tokens (seq_len + 1): a sequence belongs to the
    file of the document its first token comes from."""
    store = TokenStore(store_path, "validation.dataset_path")
    docs = pycorpus.documents("validation", packages)
    if len(docs) != store.num_documents:
        raise ValueError(f"{store_path}: {store.num_documents} documents, but the corpus lists {len(docs)}")
    files = sorted({d[0] for d in docs})
    index = {f: i for i, f in enumerate(files)}
    cum = np.concatenate([[0], np.cumsum(store.doc_lengths)])
    doc_of = np.searchsorted(cum, np.arange(num_sequences) * window, side="right") - 1
    return {"store": store_path, "packages": list(packages or []), "window": window,
            "files": files, "cluster_of_sequence": [index[docs[d][0]] for d in doc_of]}
