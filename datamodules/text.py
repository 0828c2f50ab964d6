"""TextDataModule: documents -> local BPE -> one flat token array per split -> packed blocks.

prepare_data() does the slow work once and caches it under ``cache_dir/<key>/``:

    tokenizer.json   the tokenizer (trained on the train documents only)
    train.npy        all train documents, tokenized, each followed by <|endoftext|>
    val.npy          same for the held-out documents
    meta.json        sizes and the unigram entropy; written LAST, so its presence means
                     the directory is complete and can be trusted

setup() only memory-maps those files, so it is instant and cheap in every worker.

With ``prepared`` (directories written by `haipai prepare`) none of this happens: the module hands
setup, loaders and resume state to a StreamingDataModule, so `haipai fit` streams any corpus size from
the same YAML ``data:`` section (docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from datamodules.corpus import fingerprint, load_documents
from datamodules.multiscale import MultiScaleHook, check_multiscale
from datamodules.prepare import load_index
from datamodules.streaming import StreamingDataModule
from datamodules.packed import PackedDataset, replace_atomically
from datamodules.lmlm import MARKERS, LMLMPackedDataset, check_tokenizer
from datamodules.curriculum import build_stages, check_curriculum_args, curriculum_data, warmup_data
from datamodules.tokenizer import eos_id, id_space, load_tokenizer, tokenizer_json, train_tokenizer
from haipai_lightning.config import ConfigError

# Bump when the on-disk format or the processing changes, so old caches are not reused.
FORMAT_VERSION = "haipai-text-v1"
SPLITS = ("train", "val")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) document indices, each sorted; at least one val document."""
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -sum p ln p (nats) of token frequencies: the loss of the best context-free model."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount makes an int64 copy; chunks keep that copy small
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[i : i + chunk], minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _tokenize(tok, docs: list[str], eos: int, dtype, arrow_file: Path) -> np.ndarray:
    """Tokenize with `datasets` (its arrow cache makes an interrupted run resume) and flatten."""
    import datasets

    def encode(batch: dict) -> dict:
        # add_special_tokens=False: a user tokenizer's BOS/CLS would pollute the stream.
        encs = tok.encode_batch(batch["text"], add_special_tokens=False)
        return {"ids": [e.ids + [eos] for e in encs]}

    ds = datasets.Dataset.from_dict({"text": docs}).map(
        encode,
        batched=True,
        remove_columns=["text"],
        features=datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))}),
        cache_file_name=str(arrow_file),
        desc=f"tokenizing {arrow_file.stem}",
    )
    # Flatten the arrow list column directly: no per-document Python lists.
    ids = ds.with_format("arrow")["ids"]
    chunks = getattr(ids, "chunks", [ids])
    return np.concatenate([c.flatten().to_numpy() for c in chunks]).astype(dtype)


class EpochSeededSampler(RandomSampler):
    """A RandomSampler whose order in epoch e depends only on (seed, e).

    Lightning calls set_epoch() before each epoch, so a run resumed at epoch e sees the
    same batches as an uninterrupted one. Being a RandomSampler, Lightning still knows
    the loader is shuffled and swaps in a DistributedSampler under DDP.
    """

    def __init__(self, data_source: Dataset, seed: int, epoch: int = 0, skip: int = 0):
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed + epoch))
        self.seed = seed
        self.skip = skip  # samples to skip once: the part of the epoch trained before a resume

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self):
        it, skip = super().__iter__(), self.skip
        self.skip = 0
        for i, idx in enumerate(it):
            if i >= skip:
                yield idx


def resolve_vocab_size(vocab_size: int | None, prepared: str | list[str] | None = None,
                       tokenizer_path: str | None = None) -> int:
    """The model's embedding size for these data settings (the CLI links it to model.config.vocab_size):
    data.vocab_size when set, else the prepared tokenizer's, the tokenizer_path's, or 8192 (the BPE's)."""
    if vocab_size is not None:
        return int(vocab_size)
    if prepared:
        return max(load_index(d)["vocab_size"] for d in ([prepared] if isinstance(prepared, str) else prepared))
    if tokenizer_path:
        return id_space(load_tokenizer(tokenizer_path))
    return 8192


class TextDataModule(MultiScaleHook, L.LightningDataModule):
    """Packed next-token-prediction blocks from a text corpus, with a BPE trained locally.

    With ``prepared`` it streams instead from directories written by `haipai prepare` (any corpus size,
    constant memory; datamodules.StreamingDataModule does the work), so one YAML ``data:`` section
    selects either path.

    Args:
        source: Where the text comes from: ``kjv`` (the King James Bible bundled with the
            package, one document per chapter, works offline), a local ``.txt``/``.jsonl``/
            ``.parquet`` file or a directory of them, a Hugging Face Hub dataset name, or a
            comma-separated list of these (their documents are concatenated).
        seq_len: Tokens per training example (the model's context length).
        batch_size: Examples per batch (per device).
        vocab_size: Size of the byte-level BPE trained on the train split (at least 300), which is the
            model's embedding size; null = 8192, or the size of the tokenizer of ``tokenizer_path`` /
            ``prepared`` (set it to pad the embedding beyond the tokenizer's ids).
        tokenizer_path: Path to an existing ``tokenizer.json`` to use instead of training one.
        val_fraction: Fraction of documents held out for validation (at least one document);
            the split is deterministic given ``seed``.
        seed: Seed of the train/val split and of the shuffling order of training blocks.
        cache_dir: Directory where tokenized data is cached (one sub-directory per setting).
        num_workers: DataLoader worker processes (0 = load in the main process).
        text_field: Key/column holding the text in ``.jsonl``/``.parquet``/Hub data.
        max_documents: Keep only the first N documents (quick runs and tests); None = all.
        curriculum: Score each training document's difficulty and train easy stages first
            (with ``callbacks.CurriculumSwitch``): ``length``, ``rare_words`` (share of tokens
            outside the corpus's head vocabulary) or ``reference_loss`` (a checkpoint's loss);
            also ``compression`` (zlib ratio), ``mtld`` (lexical diversity) and ``flesch`` (minus the
            reading ease): the measures of arXiv 2506.11300 (datamodules/difficulty.py). None = no curriculum.
        curriculum_stages: Number of ordered stages (buckets of about equal token mass).
        curriculum_cumulative: Stage s trains on buckets 0..s (the last stage is all the data);
            False: on bucket s alone.
        curriculum_reference: Checkpoint whose loss scores the documents (``reference_loss``).
        prepared: Stream packed blocks from directories written by `haipai prepare` instead of reading
            ``source`` (any corpus size, at constant memory): one directory or a list (a mixture);
            the curriculum then uses the scores stored by ``haipai prepare --scores``.
        weights: With a list of ``prepared`` directories: the sampling proportion of each (normalized);
            null = in proportion to their sizes.
        multiscale_lens: Multi-scale training: cut each training batch of batch_size x seq_len tokens into
            sequences of these lengths (each divides seq_len): equal tokens per step, shorter contexts;
            null = every batch at seq_len.
        multiscale_steps: Optimizer steps at which the next length of ``multiscale_lens`` begins (a schedule,
            short to long); null = each batch draws its length at random (seeded; a resume sees the same).
        curriculum_pacing: ``stages`` (with callbacks.CurriculumSwitch) or ``warmup``: easy-to-hard
            for the first ``curriculum_warmup`` fraction of the steps, then uniform random sampling.
        curriculum_warmup: Fraction of the optimizer steps of the warm-up (``warmup`` pacing).
        lmlm: The text carries LMLM lookup calls (datamodules/lmlm.py, arXiv 2505.15962): the
            tokenizer gets the four markers as special tokens and the looked-up values are masked
            out of the loss (labels -100), train and val.
    """

    def __init__(
        self,
        source: str = "kjv",
        seq_len: int = 256,
        batch_size: int = 16,
        vocab_size: int | None = None,
        tokenizer_path: str | None = None,
        val_fraction: float = 0.02,
        seed: int = 1234,
        cache_dir: str = ".haipai_cache",
        num_workers: int = 0,
        text_field: str = "text",
        max_documents: int | None = None,
        curriculum: str | None = None,
        curriculum_stages: int = 3,
        curriculum_cumulative: bool = True,
        curriculum_reference: str | None = None,
        prepared: str | list[str] | None = None,
        weights: list[float] | None = None,
        multiscale_lens: list[int] | None = None,
        multiscale_steps: list[int] | None = None,
        curriculum_pacing: str = "stages",
        curriculum_warmup: float = 0.25,
        lmlm: bool = False,
    ):
        super().__init__()
        # Fail at construction, before minutes of preprocessing, naming the config field.
        checks = [
            (seq_len >= 2, f"data.seq_len must be >= 2, got {seq_len}"),
            (batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}"),
            (0 < val_fraction < 1, f"data.val_fraction must be in (0, 1), got {val_fraction}"),
            (vocab_size is None or vocab_size >= 300, f"data.vocab_size must be >= 300 (256 bytes + specials), got {vocab_size}"),
            (weights is None or prepared, "data.weights weighs data.prepared directories; set data.prepared too"),
            (not (prepared and curriculum_reference), "data.curriculum_reference is not used with data.prepared: score "
             "the documents at prepare time (haipai prepare --scores reference_loss --score_reference CKPT)"),
            (num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}"),
            (max_documents is None or max_documents >= 2,
             f"data.max_documents must be >= 2 (one train + one val document) or null, got {max_documents}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_multiscale(multiscale_lens, multiscale_steps, seq_len)
        self.save_hyperparameters()
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.vocab_size, self.tokenizer_path = resolve_vocab_size(vocab_size, None, tokenizer_path), tokenizer_path
        self.val_fraction, self.seed, self.max_documents = val_fraction, seed, max_documents
        self.cache_dir, self.num_workers, self.text_field = cache_dir, num_workers, text_field
        # Filled by setup().
        self.tokenizer = None
        self.unigram_entropy: float | None = None
        self.vocab_size_actual: int | None = None
        self.datasets: dict[str, PackedDataset] = {}
        # curriculum (datamodules/curriculum.py): the stage schedule is attached by callbacks.CurriculumSwitch
        self.curriculum, self.curriculum_stages = curriculum, curriculum_stages
        self.curriculum_cumulative, self.curriculum_reference = curriculum_cumulative, curriculum_reference
        self.curriculum_schedule = None  # (epoch, step) -> stage
        self.multiscale_lens, self.multiscale_steps = multiscale_lens, multiscale_steps
        self.curriculum_pacing, self.curriculum_warmup = curriculum_pacing, curriculum_warmup
        self.lmlm = lmlm
        self.stream: StreamingDataModule | None = None
        if prepared:  # the streaming path; multi-scale stays here (Lightning calls this module's hooks)
            if lmlm or curriculum_pacing != "stages":
                raise ConfigError("data.prepared streams packed blocks without LMLM value masks or warm-up pacing: "
                                  "set data.lmlm false and data.curriculum_pacing stages, or train from data.source")
            self.stream = StreamingDataModule(prepared, weights, seq_len, batch_size, seed, None, num_workers,
                                              vocab_size, curriculum, curriculum_stages, curriculum_cumulative)
            self.vocab_size = self.stream.vocab_size
        else:
            check_curriculum_args(self)

    # ----------------------------------------------------------------- cache
    @property
    def cache_path(self) -> Path:
        """``cache_dir/<name>-<hash of everything that changes the result>``."""
        tok_sha = None
        if self.tokenizer_path:
            tok_file = Path(self.tokenizer_path).expanduser()
            if not tok_file.is_file():
                load_tokenizer(tok_file)  # raises the clear "data.tokenizer_path ..." error
            tok_sha = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        spec = {
            "version": FORMAT_VERSION,
            "source": self.source,
            "files": fingerprint(self.source),  # sizes + mtimes: edited files re-prepare
            "text_field": self.text_field,
            "vocab_size": None if self.tokenizer_path else self.vocab_size,
            "tokenizer_sha256": tok_sha,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "max_documents": self.max_documents,
            **({"lmlm": True} if self.lmlm else {}),  # other tokenizer (markers); absent: old caches stay valid
        }
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.source).name or self.source).strip("-")[:24]
        return Path(self.cache_dir).expanduser() / f"{name or 'data'}-{digest}"

    def prepare_data(self) -> None:
        """Load, split, train the tokenizer, tokenize and cache; a no-op when cached (or streaming)."""
        if self.stream is not None:
            return
        out = self.cache_path
        if (out / "meta.json").exists():
            return
        out.mkdir(parents=True, exist_ok=True)
        docs = load_documents(self.source, self.text_field)
        if self.max_documents is not None:
            docs = docs[: self.max_documents]
        if len(docs) < 2:
            raise ConfigError(
                f"data.source={self.source!r} gives {len(docs)} document(s); at least 2 are needed "
                f"(one is held out for validation): add text or split it with blank lines"
            )
        idx = dict(zip(SPLITS, split_documents(len(docs), self.val_fraction, self.seed)))

        tok_file = out / "tokenizer.json"
        if tok_file.exists():  # an interrupted earlier run got this far: keep its tokenizer
            tok = load_tokenizer(tok_file)
        elif self.tokenizer_path:
            tok = load_tokenizer(self.tokenizer_path)
        else:  # train split only, so validation text is truly unseen
            tok = train_tokenizer((docs[i] for i in idx["train"]), self.vocab_size, MARKERS if self.lmlm else ())
        if self.lmlm:
            tok.add_special_tokens(list(MARKERS))  # a no-op for a tokenizer trained with them
        tok.no_truncation()  # a user tokenizer.json may truncate/pad; we want every token
        tok.no_padding()
        replace_atomically(tok_file, lambda f: f.write(tok.to_str().encode()))

        vocab = id_space(tok)
        dtype = np.uint16 if vocab <= 2**16 else np.int32  # half the disk and page cache
        meta: dict = {"format": FORMAT_VERSION, "source": self.source, "vocab_size": vocab,
                      "eos_token_id": eos_id(tok), "dtype": np.dtype(dtype).name}
        for split in SPLITS:
            tokens = _tokenize(tok, [docs[i] for i in idx[split]], eos_id(tok), dtype, out / f"{split}.arrow")
            replace_atomically(out / f"{split}.npy", lambda f: np.save(f, tokens))
            meta[f"n_documents_{split}"] = len(idx[split])
            meta[f"n_tokens_{split}"] = len(tokens)
            if split == "train":
                meta["unigram_entropy"] = unigram_entropy(tokens, vocab)
        replace_atomically(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))

    def setup(self, stage: str | None = None) -> None:
        """Memory-map the cached arrays and load the tokenizer."""
        if self.stream is not None:
            self.stream.trainer = self.trainer
            self.stream.setup(stage)
            self.tokenizer, self.unigram_entropy = self.stream.tokenizer, self.stream.unigram_entropy
            self.vocab_size_actual, self.datasets = id_space(self.tokenizer), self.stream.datasets
            return
        out = self.cache_path
        if not (out / "meta.json").exists():  # e.g. used outside a Trainer
            self.prepare_data()
        meta = json.loads((out / "meta.json").read_text())
        self.tokenizer = load_tokenizer(out / "tokenizer.json")
        self.vocab_size_actual = int(meta["vocab_size"])
        self.unigram_entropy = float(meta["unigram_entropy"])
        self.datasets = {split: PackedDataset(out / f"{split}.npy", self.seq_len) for split in SPLITS}
        if self.lmlm:  # looked-up values masked out of the loss
            ids = check_tokenizer(self.tokenizer)
            self.datasets = {split: LMLMPackedDataset(out / f"{split}.npy", self.seq_len, ids[MARKERS[2]],
                                                      ids[MARKERS[3]]) for split in SPLITS}
        for split, ds in self.datasets.items():
            n = len(ds.tokens)
            if n < self.seq_len + 1:
                raise ConfigError(
                    f"the {split} split has only {n} tokens, fewer than data.seq_len + 1 = {self.seq_len + 1}; "
                    f"use a smaller data.seq_len (at most {n - 1}), more data, or a larger data.val_fraction"
                )
        if len(self.datasets["train"]) < self.batch_size:
            raise ConfigError(
                f"the train split has only {len(self.datasets['train'])} blocks of data.seq_len={self.seq_len} "
                f"tokens, fewer than data.batch_size={self.batch_size}; lower one of them or add data"
            )
        if self.curriculum:
            build_stages(self, out, meta)  # adds datasets "train_stage0".. and self.stage_docs / doc_scores

    # ----------------------------------------------------------- dataloaders
    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("call prepare_data() and setup() before asking for dataloaders")
        ds = self.datasets[split]
        if train and self.curriculum_schedule is not None:
            ds, sampler = curriculum_data(self)  # the stages, each position drawn from the stage in force
        elif train and self.curriculum and self.curriculum_pacing == "warmup":
            ds, sampler = warmup_data(self)  # easiest first for the warm-up steps, then uniform
        else:
            sampler = EpochSeededSampler(ds, self.seed, *self._resume_at()) if train else None
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,  # equal-size training batches; validation sees every block
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.stream is not None:
            self.stream.curriculum_schedule = self.curriculum_schedule  # set by callbacks.CurriculumSwitch
            return self.stream.train_dataloader()
        return self._loader("train", train=True)

    # ------------------------------------------------------- exact resume
    # Lightning restores its step counters but restarts a plain DataLoader from the top of
    # the epoch (and builds the iterator before it calls set_epoch). The data module is
    # restored before the train loader is built, so it records where the data stream
    # stood and the new sampler starts there: same epoch permutation, batches done skipped.
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if self.stream is not None:
            self.stream.trainer = trainer
            return self.stream.state_dict()
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_progress.current
        epoch = progress.processed
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        # saved at the end of an epoch that is not yet counted as processed (a save in on_train_epoch_end
        # has it counted already: adding one more would skip an epoch)
        if done >= trainer.num_training_batches and progress.processed < progress.started:
            epoch, done = epoch + 1, 0
        return {"epoch": int(epoch), "batches_done": int(done), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.stream is not None:
            return self.stream.load_state_dict(state)
        saved = state.get("batch_size", self.batch_size)
        if saved != self.batch_size:  # the stream position is in batches: another size would skip or repeat data
            raise ConfigError(f"data.batch_size={self.batch_size} but the checkpoint was trained with {saved}: an exact "
                              f"resume needs the same data.batch_size (or start a new run from its weights)")
        self._resume = dict(state)

    def _resume_at(self) -> tuple[int, int]:
        """(epoch, samples to skip) for the next train loader; consumed once."""
        state, self._resume = getattr(self, "_resume", None) or {}, None
        return state.get("epoch", 0), state.get("batches_done", 0) * self.batch_size

    def val_dataloader(self) -> DataLoader:
        if self.stream is not None:
            return self.stream.val_dataloader()
        return self._loader("val", train=False)

    # There is no separate test split: testing/predicting reuse the held-out documents.
    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    # --------------------------------------------------------------- helpers
    def tokenizer_json(self) -> str:
        """The tokenizer serialized as JSON (to store next to a checkpoint)."""
        return tokenizer_json(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        if self.stream is not None:
            return self.stream.eos_token_id
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the tokenizer is loaded there")
        return eos_id(self.tokenizer)
