"""Multi-scale training: batches of several sequence lengths in one run, at equal tokens per step.

A training batch of B blocks of ``seq_len`` tokens (B, T) is cut into (B * T / L, L) for a length L
that divides T: the same tokens in the same order, every next-token pair trained exactly once
(input piece k is tokens [kL, (k+1)L), its labels [kL+1, (k+1)L+1) -- a plain reshape of both), only
the attention context is shorter. Short sequences are cheaper per token (attention is quadratic in
L) and teach the short range first; the block order, shuffle, mixture, DDP slicing and resume of the
data module are untouched because only the batch's shape changes.

    schedule  ``multiscale_steps`` given: length i from optimizer step steps[i-1] on, short to long
              (sequence-length warm-up, Li et al. 2022, arXiv 2108.06084)
    mix       no steps: each batch draws its length uniformly, a hash of (seed, batch index across
              epochs) -- variable sequence-length training at equal tokens per step (Pouransari et al.
              2024, "Dataset Decomposition", arXiv 2405.13226)

The length is a pure function of (seed, Lightning's restored batch / step counters), so a resumed
run sees the same shapes as an uninterrupted one. It is applied in the data module's
``on_before_batch_transfer`` hook (training only; validation keeps ``seq_len``).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch

from datamodules.prepare import splitmix64
from haipai_lightning.config import ConfigError


def check_multiscale(lens: list[int] | None, steps: list[int] | None, seq_len: int) -> None:
    """One line naming the field for a bad setting (called at construction)."""
    if lens is None:
        if steps is not None:
            raise ConfigError("data.multiscale_steps needs data.multiscale_lens (the lengths it switches between)")
        return
    if not lens or any(int(L) < 2 or seq_len % int(L) for L in lens):
        raise ConfigError(f"data.multiscale_lens={list(lens)} must hold lengths >= 2 that divide data.seq_len={seq_len} "
                          f"(each batch of seq_len-token blocks is cut into pieces of that length)")
    if steps is not None:
        if len(steps) != len(lens) - 1 or any(b <= a for a, b in zip(steps, steps[1:])) or any(s < 1 for s in steps):
            raise ConfigError(f"data.multiscale_steps={list(steps)} must hold {len(lens) - 1} ascending steps >= 1 "
                              f"(where each next length of data.multiscale_lens begins), or be null for a random mix")


def length_at(lens: list[int], steps: list[int] | None, seed: int, step: int, batch_index: int) -> int:
    """The sequence length of the training batch `batch_index` (across epochs) of optimizer step `step`."""
    if steps is not None:
        return int(lens[bisect.bisect_right(list(steps), step)])
    h = splitmix64(np.array([batch_index], np.uint64) ^ splitmix64(np.array([seed + 0x5EED], np.uint64)))[0]
    return int(lens[int(h % np.uint64(len(lens)))])


def cut(batch: Any, length: int) -> Any:
    """(B, T) tensors of a batch -> (B * T / length, length); other entries unchanged."""
    if isinstance(batch, dict):
        return {k: cut(v, length) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dim() == 2 and batch.shape[1] != length:
        return batch.reshape(-1, length)  # contiguous pieces of each row, rows in order
    return batch


class MultiScaleHook:
    """Mixin for a LightningDataModule with ``multiscale_lens``, ``multiscale_steps``, ``seed``."""

    multiscale_lens: list[int] | None = None
    multiscale_steps: list[int] | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if not self.multiscale_lens or trainer is None or not trainer.training:
            return batch
        # the index this batch will get: counters are restored on resume, so the length is too
        index = int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        return cut(batch, length_at(self.multiscale_lens, self.multiscale_steps, self.seed, trainer.global_step, index))
