"""Datasets of the local tasks, read from the jsonl files beside this module.

lm-eval imports this file by its path (``custom_dataset: !function local_data.<name>``
in the YAML) and calls the function with the task's metadata as keyword arguments, so
the data are found wherever the package is installed and ``datasets`` never goes to
the hub or writes a cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def read_jsonl(name: str) -> list[dict]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _test_split(name: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_jsonl(name))})


def heldout(**_metadata) -> datasets.DatasetDict:
    return _test_split("tst_heldout.jsonl")


def tiny_mc(**_metadata) -> datasets.DatasetDict:
    return _test_split("tst_tiny_mc.jsonl")
