"""Token arrays on disk: fixed-length blocks read through a memory map, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def replace_atomically(path: Path, write) -> None:
    """Write via a temporary name then rename: readers never see a half-written file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class PackedDataset(Dataset):
    """Fixed blocks of a flat token array: block i is tokens[i*T : i*T + T + 1].

    Consecutive blocks overlap by one token so every token is a label exactly once.
    """

    def __init__(self, path: str | Path, seq_len: int):
        self.path = str(path)
        self.seq_len = seq_len
        self.tokens = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        block = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {"input_ids": block[:-1], "labels": block[1:]}

    # Workers started with "spawn" get the dataset pickled: reopen the file there
    # instead of copying the whole token array into the pickle.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokens": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.tokens = np.load(self.path, mmap_mode="r")
