"""Loader of the local task's data: the jsonl next to this file, as a datasets.DatasetDict (offline)."""

import json
from pathlib import Path

import datasets


def load_local(**_: object) -> datasets.DatasetDict:
    """lm_eval calls this with the task's metadata; the data never leaves this directory."""
    with open(Path(__file__).with_name("kjv_cloze.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
