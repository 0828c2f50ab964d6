"""Curriculum over prepared (streamed) data: difficulty scores per document at prepare time, stages of blocks at train time.

Prepare time (``haipai prepare --scores length,rare_words``): `prepare` stored the end offset of every
train document (``train-docs-00000.bin``, uint64); `add_scores` reads the train stream back in windows
of whole documents (~``window`` tokens, constant memory), scores each window's documents with
datamodules.curriculum.score_documents (the same measures as TextDataModule's curriculum) and writes
one float64 per document to ``train-scores-<kind>-00000.bin``, listed in index.json. ``rare_words``
takes its head vocabulary from the window (exact when the train split fits in one window, an estimate
from >= 4M tokens otherwise); ``length`` and ``reference_loss`` are per document and exact.

Train time (`stage_blocks`): documents are cut into stages by score (stage_documents: buckets of equal
token mass, easy first); a block of ``seq_len + 1`` tokens belongs to the stage of the document holding
its first token (blocks are not rewritten per stage: the shards stay the only copy of the data). The
block ids of a stage take 8 bytes per block (1/4096 of a uint16 corpus at seq_len 2048).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.curriculum import SCORES, score_documents, stage_documents
from datamodules.packed import replace_atomically
from datamodules.prepare import INDEX, ShardWriter, load_index
from haipai_lightning.config import ConfigError

SCORE_WINDOW = 1 << 22  # tokens scored together (rare_words' head vocabulary comes from one window)


def read_array(d: Path, entries: list[dict], dtype: str) -> np.ndarray:
    """The concatenation of the listed files (document ends, scores: 8 bytes per document)."""
    parts = [np.fromfile(d / e["file"], dtype=np.dtype(dtype).newbyteorder("<")) for e in entries]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def read_tokens(d: Path, shards: list[dict], dtype: str, a: int, b: int) -> np.ndarray:
    """Tokens [a, b) of a split's stream, across shard files."""
    item, out, start = np.dtype(dtype).itemsize, [], 0
    for sh in shards:
        lo, hi = max(a, start), min(b, start + sh["n_tokens"])
        if lo < hi:
            out.append(np.fromfile(d / sh["file"], dtype=np.dtype(dtype).newbyteorder("<"), count=hi - lo,
                                   offset=(lo - start) * item))
        start += sh["n_tokens"]
    return np.concatenate(out) if out else np.zeros(0, dtype)


def doc_ends(d: Path, index: dict) -> np.ndarray:
    if "docs" not in index:
        raise ConfigError(f"{d} was prepared without document offsets (an older `haipai prepare`); prepare it again")
    return read_array(d, index["docs"]["train"], "uint64").astype(np.int64)


def add_scores(prepared: str, kinds: list[str], reference: str | None = None, window: int = SCORE_WINDOW) -> dict:
    """Score every train document of a prepared directory by each of ``kinds``; returns the new index."""
    d = Path(prepared).expanduser()
    bad = [k for k in kinds if k not in SCORES]
    if bad:
        raise ConfigError(f"--scores {bad[0]!r} is unknown; use some of {', '.join(SCORES)}")
    if "reference_loss" in kinds and not reference:
        raise ConfigError("--scores reference_loss needs --score_reference (a Haipai checkpoint whose loss scores them)")
    index = load_index(d)
    ends = doc_ends(d, index)
    writers = {k: ShardWriter(d, f"train-scores-{k}", "float64", 1 << 62) for k in kinds}
    first = 0
    while first < len(ends):
        a = int(ends[first - 1]) if first else 0
        stop = min(max(int(np.searchsorted(ends, a + window, side="left")) + 1, first + 1), len(ends))
        tokens = read_tokens(d, index["splits"]["train"], index["dtype"], a, int(ends[stop - 1]))
        e = ends[first:stop] - a
        bounds = np.stack([np.concatenate([[0], e[:-1]]), e], axis=1)  # (docs in window, 2)
        for k, w in writers.items():
            w.write(np.asarray(score_documents(k, tokens, bounds, index["vocab_size"], reference), np.float64))
        first = stop
    index["scores"] = {**index.get("scores", {}), **{k: w.finish() for k, w in writers.items()}}
    index["score_window"] = window
    replace_atomically(d / INDEX, lambda f: f.write(json.dumps(index, indent=1).encode()))
    return index


def stage_blocks(src, n_train: int, kind: str, n_stages: int, cumulative: bool) -> list[np.ndarray]:
    """Train block ids (< n_train) of each stage of one prepared source (a streaming.Source)."""
    index = src.index
    if kind not in index.get("scores", {}):
        raise ConfigError(f"data.curriculum={kind} needs per-document scores in {src.dir}: prepare it with "
                          f"`haipai prepare ... --scores {kind}`")
    ends = doc_ends(src.dir, index)
    scores = read_array(src.dir, index["scores"][kind], "float64")
    lengths = np.diff(np.concatenate([[0], ends]))
    bucket = np.empty(len(ends), np.int64)  # the stage bucket of each document
    for s, ids in enumerate(stage_documents(scores, lengths, n_stages, cumulative=False)):
        bucket[ids] = s
    shard_tok = np.concatenate([[0], np.cumsum([sh["n_tokens"] for sh in index["splits"]["train"]])])
    counts = np.diff(src.starts["train"])  # blocks per shard
    first_token = np.repeat(shard_tok[:-1], counts) + (np.arange(int(counts.sum())) - np.repeat(src.starts["train"][:-1], counts)) * src.seq_len
    block_bucket = bucket[np.minimum(np.searchsorted(ends, first_token[:n_train], side="right"), len(ends) - 1)]
    return [np.flatnonzero(block_bucket <= s if cumulative else block_bucket == s) for s in range(n_stages)]


class StageBlocks(Dataset):
    """The train blocks of one curriculum stage across the prepared sources, in source order."""

    def __init__(self, sources: list, blocks: list[np.ndarray]):
        self.sources = sources
        self.src = np.repeat(np.arange(len(sources), dtype=np.int64), [len(b) for b in blocks])
        self.block = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.block)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(self.sources[int(self.src[i])].read("train", int(self.block[i])).astype(np.int64))
        return {"input_ids": x[:-1], "labels": x[1:]}
