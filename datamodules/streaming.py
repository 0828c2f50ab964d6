"""StreamingDataModule: packed blocks streamed from `haipai prepare` directories at constant memory.

Blocks: shard s of ``n`` tokens holds ``(n - 1) // seq_len`` blocks of ``seq_len + 1`` tokens (block i
starts at token ``i * seq_len``; blocks never span shards). A block is read with one ``os.pread`` of
``(seq_len + 1) * itemsize`` bytes: nothing is memory-mapped (mapped pages would count in the RSS),
nothing is held but the shard table of each directory.

Order of an epoch (all O(1) memory, a pure function of (seed, epoch, draw number j)):
  * mixture: draw j picks directory d with probability weights[d] (numpy draws in chunks of 65,536
    seeded by (seed, epoch, chunk)); the k-th draw of d reads d's block ``perm(k mod N_d)``, where
    ``perm`` is a Feistel bijection of [0, N_d) keyed by (seed, d, epoch, k div N_d): a full shuffle
    without a permutation array; a directory drawn more than N_d times starts a new pass.
  * DDP: rank r of w takes the draws j = i * w + r; the epoch is ``sum N_d // w`` draws per rank.
  * batches are built in the dataset (DataLoader batch_size=None): loader worker q of Q yields the
    batches b with (b - first) mod Q == q, which the DataLoader's round robin returns in order b, so
    the batch sequence does not depend on num_workers.
  * exact resume: state_dict records (epoch, batches done); the next train loader starts there.
  * curriculum (data.curriculum + callbacks.CurriculumSwitch): the blocks of each stage come from the
    per-document scores stored at prepare time (prepared_curriculum.py) and are drawn by the same
    CurriculumSampler as TextDataModule's; multi-scale batches: datamodules/multiscale.py.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.curriculum import SCORES, curriculum_data
from datamodules.multiscale import MultiScaleHook, check_multiscale
from datamodules.prepare import TOKENIZER, load_index, splitmix64
from datamodules.prepared_curriculum import StageBlocks, stage_blocks
from datamodules.tokenizer import id_space, load_tokenizer, tokenizer_json
from haipai_lightning.config import ConfigError

CHUNK = 1 << 16  # mixture draws generated per numpy call


_mix = splitmix64  # the same hash as prepare.py's val split


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) applied to ``idx``: 4-round Feistel on 2*h bits + cycle walking."""
    half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    mask, h = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _mix(np.arange(4, dtype=np.uint64) + np.uint64(key % 2**64))

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> h, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << h) | right

    y = rounds(np.asarray(idx, dtype=np.uint64))
    bad = y >= np.uint64(n)
    while bad.any():
        y[bad] = rounds(y[bad])
        bad = y >= np.uint64(n)
    return y.astype(np.int64)


@functools.lru_cache(maxsize=4096)
def _key(*parts: int) -> int:
    return int(np.random.default_rng([int(p) for p in parts]).integers(0, 2**63))


class Source:
    """One prepared directory: its shard table and block reads (``os.pread``; fds opened lazily)."""

    def __init__(self, prepared: str, seq_len: int):
        self.dir, self.seq_len = Path(prepared).expanduser(), seq_len
        self.index = load_index(self.dir)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.files, self.starts = {}, {}
        for split, shards in self.index["splits"].items():
            self.files[split] = [str(self.dir / sh["file"]) for sh in shards]
            blocks = [max(0, (sh["n_tokens"] - 1) // seq_len) for sh in shards]
            self.starts[split] = np.concatenate([[0], np.cumsum(blocks, dtype=np.int64)])
        self._fds: dict[str, int] = {}

    def n_blocks(self, split: str) -> int:
        return int(self.starts[split][-1]) if split in self.starts else 0

    def read(self, split: str, block: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts[split], block, side="right") - 1)
        path = self.files[split][s]
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        n = (self.seq_len + 1) * self.dtype.itemsize
        data = os.pread(self._fds[path], n, (int(block) - int(self.starts[split][s])) * self.seq_len * self.dtype.itemsize)
        if len(data) != n:
            raise ConfigError(f"shard {path!r} is shorter than its index says; prepare {str(self.dir)!r} again")
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict:  # worker processes open their own descriptors
        return {**self.__dict__, "_fds": {}}


def _as_batch(blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(np.stack(blocks).astype(np.int64))
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


class MixtureStream(IterableDataset):
    """The shuffled, mixed, rank-sliced train batches of one run (see the module docstring)."""

    def __init__(self, sources: list[Source], n_train: list[int], weights: list[float] | None, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, epoch: int = 0, skip_batches: int = 0):
        self.sources, self.n_train, self.batch_size, self.seed = sources, n_train, batch_size, seed
        w = np.asarray(weights if weights is not None else n_train, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = epoch, skip_batches
        self._started = False
        self._bases: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(self.n_train) // self.world_size // self.batch_size

    def begin_epoch(self) -> None:
        """Called by the train loader at each iter(): the next epoch (the skip applies to the first only)."""
        if self._started:
            self.epoch, self.skip, self._bases = self.epoch + 1, 0, []
        self._started = True

    # --------------------------------------------------------------- order
    def _choices(self, c: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, self.epoch, c, 7]).random(CHUNK)
        return np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.sources) - 1)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(directory of each draw, its per-directory draw count) for chunk c of the epoch; the last one cached."""
        if getattr(self, "_cached", (None,))[0] == (self.epoch, c):
            return self._cached[1]
        while len(self._bases) <= c:  # per-directory draw counts before each chunk
            prev = len(self._bases) - 1
            self._bases.append(np.zeros(len(self.sources), np.int64) if prev < 0 else
                               self._bases[prev] + np.bincount(self._choices(prev), minlength=len(self.sources)))
        ch = self._choices(c)
        kin = np.empty(CHUNK, np.int64)
        for s in range(len(self.sources)):
            pos = np.flatnonzero(ch == s)
            kin[pos] = self._bases[c][s] + np.arange(len(pos))
        self._cached = ((self.epoch, c), (ch, kin))
        return ch, kin

    def draws(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(directory, its draw count k) of global draws j."""
        if len(self.sources) == 1:
            return np.zeros(len(j), np.int64), np.asarray(j, np.int64)
        d, k = np.empty(len(j), np.int64), np.empty(len(j), np.int64)
        for c in np.unique(j // CHUNK):
            ch, kin = self._chunk(int(c))
            sel = j // CHUNK == c
            d[sel], k[sel] = ch[j[sel] % CHUNK], kin[j[sel] % CHUNK]
        return d, k

    def blocks(self, j: np.ndarray) -> list[tuple[int, int]]:
        """(directory, block) of global draws j."""
        d, k = self.draws(j)
        out = np.empty(len(j), np.int64)
        for s in np.unique(d):
            n = self.n_train[s]
            for p in np.unique(k[d == s] // n):
                sel = (d == s) & (k // n == p)
                out[sel] = permute(k[sel] % n, n, _key(self.seed, s, self.epoch, p))
        return list(zip(d.tolist(), out.tolist()))

    def batch_blocks(self, b: int) -> list[tuple[int, int]]:
        i = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
        return self.blocks(i * self.world_size + self.rank)

    def __iter__(self):
        info = get_worker_info()
        q, nq = (info.id, info.num_workers) if info else (0, 1)
        for b in range(self.skip + q, len(self), nq):
            yield _as_batch([self.sources[d].read("train", blk) for d, blk in self.batch_blocks(b)])


class _EpochLoader(DataLoader):
    """A DataLoader that tells its MixtureStream a new epoch begins (before workers get their copy)."""

    def __iter__(self):
        self.dataset.begin_epoch()
        return super().__iter__()


class BlockList(Dataset):
    """Validation blocks in order: per directory its val split, or the held-out tail of its train split."""

    def __init__(self, segments: list[tuple[Source, str, int, int]]):
        self.segments = segments  # (source, split, first block, n blocks)
        self.starts = np.concatenate([[0], np.cumsum([n for *_, n in segments], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        src, split, first, _ = self.segments[s]
        block = torch.from_numpy(src.read(split, first + i - int(self.starts[s])).astype(np.int64))
        return {"input_ids": block[:-1], "labels": block[1:]}


class StreamingDataModule(MultiScaleHook, L.LightningDataModule):
    """Packed next-token blocks streamed from directories written by `haipai prepare`.

    Args:
        prepared: A prepared directory, or several (a mixture; all must share one tokenizer).
        weights: Sampling proportion of each directory (normalized); None = in proportion to their sizes.
        seq_len: Tokens per training example (the model's context length).
        batch_size: Examples per batch (per device).
        seed: Seed of the shuffle and of the mixture draws (the order is a pure function of seed and epoch).
        val_fraction: Hold out this fraction of each directory's train blocks (its tail) for validation;
            None = the prepared val split (or 1% of the train blocks when a directory has none).
        num_workers: DataLoader worker processes (the batches do not depend on it).
        vocab_size: The model's embedding size; None = the prepared tokenizer's. Must be >= the tokenizer's.
        curriculum: Train easy stages first (with callbacks.CurriculumSwitch) by a score stored at prepare
            time (`haipai prepare --scores KIND`): ``length``, ``rare_words`` or ``reference_loss``; None = none.
        curriculum_stages: Number of ordered stages (buckets of about equal token mass).
        curriculum_cumulative: Stage s trains on buckets 0..s; False: on bucket s alone.
        multiscale_lens: Multi-scale training: cut each training batch into sequences of these lengths
            (each divides seq_len; equal tokens per step); None = every batch at seq_len.
        multiscale_steps: Optimizer steps where the next length of multiscale_lens begins (a schedule,
            short to long); None = each batch draws its length at random (seeded, resumable).
    """

    def __init__(self, prepared: str | list[str], weights: list[float] | None = None, seq_len: int = 256,
                 batch_size: int = 16, seed: int = 1234, val_fraction: float | None = None, num_workers: int = 0,
                 vocab_size: int | None = None, curriculum: str | None = None, curriculum_stages: int = 3,
                 curriculum_cumulative: bool = True, multiscale_lens: list[int] | None = None,
                 multiscale_steps: list[int] | None = None):
        super().__init__()
        dirs = [prepared] if isinstance(prepared, str) else list(prepared)
        checks = [
            (len(dirs) >= 1, "data.prepared must name at least one prepared directory"),
            (seq_len >= 2, f"data.seq_len must be >= 2, got {seq_len}"),
            (batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}"),
            (val_fraction is None or 0 < val_fraction < 1, f"data.val_fraction must be in (0, 1) or null, got {val_fraction}"),
            (num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}"),
            (weights is None or (len(weights) == len(dirs) and all(w >= 0 for w in weights) and sum(weights) > 0),
             f"data.weights must hold one non-negative weight per prepared directory ({len(dirs)}), got {weights}"),
            (curriculum is None or curriculum in SCORES,
             f"data.curriculum={curriculum!r} is unknown; use one of {', '.join(SCORES)} (or null)"),
            (curriculum is None or weights is None, "data.curriculum draws its stages over all blocks of data.prepared; "
             "it cannot follow data.weights too (set one of them to null)"),
            (curriculum_stages >= 1, f"data.curriculum_stages={curriculum_stages} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_multiscale(multiscale_lens, multiscale_steps, seq_len)
        self.save_hyperparameters()
        self.dirs, self.weights, self.seq_len, self.batch_size = dirs, weights, seq_len, batch_size
        self.seed, self.val_fraction, self.num_workers = seed, val_fraction, num_workers
        self.curriculum, self.curriculum_stages, self.curriculum_cumulative = curriculum, curriculum_stages, curriculum_cumulative
        self.curriculum_schedule = None  # (epoch, step) -> stage, attached by callbacks.CurriculumSwitch
        self.multiscale_lens = [int(x) for x in multiscale_lens] if multiscale_lens else None
        self.multiscale_steps = [int(x) for x in multiscale_steps] if multiscale_steps else None
        indexes = [load_index(d) for d in dirs]  # cheap (JSON + stat): fail now, before the model is built
        shas = {ix["tokenizer_sha256"] for ix in indexes}
        if len(shas) > 1:
            raise ConfigError(f"data.prepared directories use different tokenizers ({', '.join(dirs)}); "
                              f"prepare them all with the same --tokenizer")
        self.vocab_size_prepared = max(ix["vocab_size"] for ix in indexes)
        if vocab_size is not None and vocab_size < self.vocab_size_prepared:
            raise ConfigError(f"data.vocab_size={vocab_size} is smaller than the prepared tokenizer's "
                              f"{self.vocab_size_prepared} ids; set it >= {self.vocab_size_prepared} or leave it null")
        self.vocab_size = vocab_size or self.vocab_size_prepared
        self.eos_token_id_prepared = indexes[0]["eos_token_id"]
        self.unigram_entropy = indexes[0].get("unigram_entropy") if len(indexes) == 1 else None
        self.rank, self.world_size = 0, 1  # from the trainer in setup(); tests may set them
        self.tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self.sources: list[Source] = []
        self._resume: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        trainer = self._trainer_or_none()
        if trainer is not None:
            self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)
        self.sources = [Source(d, self.seq_len) for d in self.dirs]
        tok_file = Path(self.dirs[0]).expanduser() / TOKENIZER
        try:
            self.tokenizer = load_tokenizer(tok_file)
        except Exception as e:
            raise ConfigError(f"{tok_file} is missing or unreadable ({e}); prepare {self.dirs[0]!r} again") from None
        if id_space(self.tokenizer) > self.vocab_size:
            raise ConfigError(f"{tok_file} has {id_space(self.tokenizer)} ids but data.vocab_size={self.vocab_size}: "
                              f"the tokenizer does not match the prepared index; prepare {self.dirs[0]!r} again")
        self.n_train, self.val_segments = [], []
        for src in self.sources:
            n, nv = src.n_blocks("train"), src.n_blocks("val")
            if self.val_fraction is None and nv > 0:
                self.val_segments.append((src, "val", 0, nv))
            else:
                held = max(1, round(n * (self.val_fraction or 0.01)))
                n -= held
                self.val_segments.append((src, "train", n, held))
            if n < 1:
                raise ConfigError(f"data.prepared={str(src.dir)!r} has too few tokens for one train block of "
                                  f"data.seq_len={self.seq_len}; use a smaller seq_len or more data")
            self.n_train.append(n)
        if sum(self.n_train) // self.world_size < self.batch_size:
            raise ConfigError(f"the train split has only {sum(self.n_train)} blocks of data.seq_len={self.seq_len} "
                              f"for {self.world_size} rank(s), fewer than data.batch_size={self.batch_size}")
        if self.curriculum:
            per_source = [stage_blocks(src, n, self.curriculum, self.curriculum_stages, self.curriculum_cumulative)
                          for src, n in zip(self.sources, self.n_train)]
            for s in range(self.curriculum_stages):
                ds = StageBlocks(self.sources, [blocks[s] for blocks in per_source])
                if len(ds) < self.batch_size:
                    raise ConfigError(f"curriculum stage {s} has {len(ds)} blocks of data.seq_len={self.seq_len}, fewer "
                                      f"than data.batch_size={self.batch_size}; use fewer data.curriculum_stages")
                self.datasets[f"train_stage{s}"] = ds

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    def train_stream(self, epoch: int = 0, skip_batches: int = 0) -> MixtureStream:
        return MixtureStream(self.sources, self.n_train, self.weights, self.batch_size, self.seed,
                             self.rank, self.world_size, epoch, skip_batches)

    def train_dataloader(self) -> DataLoader:
        if not self.sources:
            raise RuntimeError("call setup() before asking for dataloaders")
        if self.curriculum_schedule is not None:  # the stages, each position drawn from the stage in force
            ds, sampler = curriculum_data(self)
            return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                              num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        state, self._resume = self._resume or {}, None
        ds = self.train_stream(state.get("epoch", 0), state.get("batches_done", 0))
        return _EpochLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        if not self.sources:
            raise RuntimeError("call setup() before asking for dataloaders")
        return DataLoader(BlockList(self.val_segments), batch_size=self.batch_size, num_workers=self.num_workers)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    # ------------------------------------------------------- exact resume
    def state_dict(self) -> dict[str, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_progress.current
        epoch, done = progress.processed, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches and progress.processed < progress.started:
            epoch, done = epoch + 1, 0
        return {"epoch": int(epoch), "batches_done": int(done), "batch_size": int(self.batch_size),
                "seq_len": int(self.seq_len), "world_size": int(self.world_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, now in (("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if state.get(key, now) != now:
                raise ConfigError(f"data.{key}={now} but the checkpoint was trained with {state[key]}: an exact resume "
                                  f"needs the same data.{key} (or start a new run from its weights)")
        self._resume = dict(state)

    def _resume_at(self) -> tuple[int, int]:
        """(epoch, samples to skip) for the next train loader (curriculum_data's interface); consumed once."""
        state, self._resume = self._resume or {}, None
        return state.get("epoch", 0), state.get("batches_done", 0) * self.batch_size

    # --------------------------------------------------------------- helpers
    def tokenizer_json(self) -> str:
        """The tokenizer serialized as JSON (to store next to a checkpoint)."""
        return tokenizer_json(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return int(self.eos_token_id_prepared)
