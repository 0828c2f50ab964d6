"""Curriculum data: score each training document's difficulty, split into ordered stages.

Curriculum learning for tiny LMs (arXiv 2506.11300): a tiny model converges faster when it sees easy text
first. A document's difficulty is one of

    length          its number of tokens (short chapters first)
    rare_words      the fraction of its tokens outside the corpus's head vocabulary: the most
                    frequent tokens that together make `head_mass` (90%) of the training tokens
                    (unigram statistics of the train split; BPE tokens, not whitespace words)
    reference_loss  its mean next-token loss under a reference checkpoint (`reference`)
    compression     zlib-compressed / raw bytes of its text (datamodules/difficulty.py)
    mtld            its lexical diversity, MTLD (McCarthy & Jarvis 2010)
    flesch          minus its Flesch reading ease

The last three are the measures arXiv 2506.11300 finds most useful. Pacing (`data.curriculum_pacing`):

  stages   (default) documents are sorted by score and cut into `n_stages` buckets of about equal token mass.
           Stage s trains on buckets 0..s (`cumulative`, so the last stage is the whole corpus) or on
           bucket s alone. The stage in force comes from a schedule (callbacks.CurriculumSwitch), read
           by `CurriculumSampler` as it draws each position, so an exact resume sees the same stages.
  warmup   the paper's best use (its section 4.3): easy-to-hard for the first `curriculum_warmup` fraction
           of the optimizer steps, then uniform random sampling (`WarmupSampler`); no callback needed.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from datamodules.packed import PackedDataset, replace_atomically
from haipai_lightning.config import ConfigError

from datamodules.difficulty import MEASURES, text_scores

SCORES = ("length", "rare_words", "reference_loss", *MEASURES)
PACINGS = ("stages", "warmup")


def document_bounds(tokens: np.ndarray, eos: int) -> np.ndarray:
    """(n_docs, 2) [start, end) of each document of a flat array; each ends with its <eos>."""
    ends = np.flatnonzero(np.asarray(tokens) == eos) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]])
    return np.stack([starts, ends], axis=1)


def rare_word_rate(tokens: np.ndarray, bounds: np.ndarray, vocab_size: int, head_mass: float = 0.9) -> np.ndarray:
    """Per document: fraction of tokens outside the head vocabulary covering `head_mass` of the corpus."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order]) / counts.sum()
    head = order[: int(np.searchsorted(covered, head_mass)) + 1]
    rare = np.ones(vocab_size, dtype=bool)
    rare[head] = False
    is_rare = rare[np.asarray(tokens, dtype=np.int64)].astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(is_rare)])
    return (csum[bounds[:, 1]] - csum[bounds[:, 0]]) / np.maximum(bounds[:, 1] - bounds[:, 0], 1)


@torch.no_grad()
def reference_loss(tokens: np.ndarray, bounds: np.ndarray, ckpt_path: str, window: int | None = None,
                   batch_size: int = 16) -> np.ndarray:
    """Per document: mean next-token NLL (nats) under the reference checkpoint's model."""
    from haipai_lightning.io.loader import load_model

    model, _ = load_model(ckpt_path)
    model.eval()
    window = window or model.cfg.max_seq_len
    pieces = []  # (doc, start, end) windows of at most window + 1 tokens
    for d, (s, e) in enumerate(bounds):
        for a in range(s, max(e - 1, s + 1), window):
            if min(a + window + 1, e) - a >= 2:
                pieces.append((d, a, min(a + window + 1, e)))
    nll, cnt = np.zeros(len(bounds)), np.zeros(len(bounds))
    for i in range(0, len(pieces), batch_size):
        chunk = pieces[i : i + batch_size]
        L = max(e - a for _, a, e in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L - 1, dtype=torch.bool)
        for j, (_, a, e) in enumerate(chunk):
            x[j, : e - a] = torch.from_numpy(np.asarray(tokens[a:e], dtype=np.int64))
            mask[j, : e - a - 1] = True
        logits = model(x[:, :-1]).logits.float()  # (b, L-1, V); right padding cannot leak left (causal)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        for j, (d, _, _) in enumerate(chunk):
            nll[d] += float(loss[j][mask[j]].sum())
            cnt[d] += int(mask[j].sum())
    return nll / np.maximum(cnt, 1)


def score_documents(kind: str, tokens: np.ndarray, bounds: np.ndarray, vocab_size: int,
                    reference: str | None = None, decode: Callable[[list[list[int]]], list[str]] | None = None
                    ) -> np.ndarray:
    """(n_docs,) difficulty; the text measures decode each document with `decode` (a batch decoder)."""
    if kind in MEASURES:
        if decode is None:
            raise ValueError(f"curriculum score {kind!r} reads the documents' text: pass decode=tokenizer.decode_batch")
        texts = decode([np.asarray(tokens[s:e], dtype=np.int64).tolist() for s, e in bounds])
        return text_scores(kind, texts)
    if kind == "length":
        return (bounds[:, 1] - bounds[:, 0]).astype(np.float64)
    if kind == "rare_words":
        return rare_word_rate(tokens, bounds, vocab_size)
    if kind == "reference_loss":
        if not reference:
            raise ConfigError("data.curriculum=reference_loss needs data.curriculum_reference: the path of a "
                              "Haipai checkpoint whose loss scores the documents")
        return reference_loss(tokens, bounds, reference)
    raise ConfigError(f"data.curriculum={kind!r} is unknown; use one of {', '.join(SCORES)} (or null for none)")


def stage_documents(scores: np.ndarray, lengths: np.ndarray, n_stages: int, cumulative: bool = True) -> list[np.ndarray]:
    """Document ids of each stage, easiest first; buckets of about equal token mass."""
    order = np.argsort(scores, kind="stable")  # ties keep corpus order
    mass = np.cumsum(lengths[order]) / lengths.sum()
    bucket = np.minimum((mass * n_stages - 1e-9).astype(int), n_stages - 1)  # (n_docs,) in sorted order
    buckets = [order[bucket == s] for s in range(n_stages)]
    if any(len(b) == 0 for b in buckets):
        raise ConfigError(f"data.curriculum_stages={n_stages} leaves a stage without documents; use fewer stages")
    if cumulative:
        return [np.concatenate(buckets[: s + 1]) for s in range(n_stages)]
    return buckets


def stage_tokens(tokens: np.ndarray, bounds: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The documents `docs` (in that order) concatenated into one flat array."""
    return np.concatenate([np.asarray(tokens[s:e]) for s, e in bounds[docs]])


class CurriculumSampler(Sampler[int]):
    """Indices into the concatenation of the stage datasets, drawing each position from its stage.

    An epoch is a permutation of the blocks of the stage in force when it starts
    (`stage_of(epoch, step)`); a position whose step falls in a later stage (switching at
    given steps) draws a uniformly random block of that stage. Everything depends only on
    (seed, epoch) and the schedule, so a resume (which skips `skip` positions once) sees the
    same blocks; `set_epoch` is called by Lightning before each epoch.
    """

    def __init__(self, sizes: Sequence[int], seed: int, stage_of: Callable[[int, int], int],
                 first_step: Callable[[], int], per_step: int, epoch: int = 0, skip: int = 0) -> None:
        self.sizes, self.offsets = list(sizes), np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        self.seed, self.stage_of, self.first_step, self.per_step = seed, stage_of, first_step, per_step
        self.epoch, self.skip = epoch, skip
        self.start_stage = stage_of(epoch, first_step())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.sizes[self.start_stage]

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        s0 = self.start_stage
        perm = torch.randperm(self.sizes[s0], generator=g).tolist()
        u = torch.rand(len(perm), generator=g, dtype=torch.float64).tolist()
        skip, self.skip = self.skip, 0
        step0 = self.first_step()  # the optimizer step the first yielded position belongs to
        for i in range(skip, len(perm)):
            s = self.stage_of(self.epoch, step0 + (i - skip) // self.per_step)
            idx = perm[i] if s == s0 else min(int(u[i] * self.sizes[s]), self.sizes[s] - 1)
            yield self.offsets[s] + idx


class WarmupSampler(Sampler[int]):
    """Easy-to-hard warm-up, then uniform random sampling (arXiv 2506.11300, section 4.3).

    The dataset's blocks are ordered easiest first (documents sorted by score). Position g of
    training (g = optimizer step x positions per step + index in the step) takes, during the first
    `warmup_steps` steps, block floor(g * N / (warmup_steps * per_step)): one sweep from the easiest
    to the hardest block, so every warm-up batch is at least as hard as the one before. Afterwards
    positions are the epoch's seeded permutation of all N blocks (uniform random sampling). A pure
    function of (seed, epoch, step), so a resume (which skips `skip` positions once) is exact.
    """

    def __init__(self, n_blocks: int, seed: int, warmup_steps: int, first_step: Callable[[], int], per_step: int,
                 epoch: int = 0, skip: int = 0) -> None:
        self.n, self.seed, self.warmup_steps, self.first_step, self.per_step = n_blocks, seed, warmup_steps, first_step, per_step
        self.epoch, self.skip = epoch, skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        skip, self.skip = self.skip, 0
        g0 = self.first_step() * self.per_step  # the global position of the first yielded index
        span = max(1, self.warmup_steps * self.per_step)
        for i in range(skip, self.n):
            g = g0 + i - skip
            yield min(g * self.n // span, self.n - 1) if g < span else perm[i]


# ------------------------------------------------------------- TextDataModule's side
def check_curriculum_args(dm) -> None:
    """Fail at construction, naming the field."""
    if dm.curriculum is None:
        return
    if dm.curriculum not in SCORES:
        raise ConfigError(f"data.curriculum={dm.curriculum!r} is unknown; use one of {', '.join(SCORES)} (or null)")
    if getattr(dm, "lmlm", False):  # the stage arrays are plain PackedDatasets: the values would be learned
        raise ConfigError("data.curriculum does not combine with data.lmlm yet (the stages would not mask the looked-up "
                          "values); use one of them")
    if dm.curriculum_pacing not in PACINGS:
        raise ConfigError(f"data.curriculum_pacing={dm.curriculum_pacing!r} is unknown; use stages or warmup")
    if dm.curriculum_pacing == "warmup" and not 0 < dm.curriculum_warmup < 1:
        raise ConfigError(f"data.curriculum_warmup={dm.curriculum_warmup} must be in (0, 1): the fraction of the "
                          "optimizer steps trained easy-to-hard before uniform random sampling")
    if dm.curriculum_stages < 1:
        raise ConfigError(f"data.curriculum_stages={dm.curriculum_stages} must be >= 1")
    if dm.curriculum == "reference_loss" and not dm.curriculum_reference:
        raise ConfigError("data.curriculum=reference_loss needs data.curriculum_reference (a Haipai checkpoint path)")


def build_stages(dm, out, meta: dict) -> None:
    """Score the train documents, write one token array per stage (cached), add their datasets."""
    import hashlib
    import json

    ref_sha = None
    if dm.curriculum == "reference_loss":
        with open(dm.curriculum_reference, "rb") as f:
            ref_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    n_stages = 1 if dm.curriculum_pacing == "warmup" else dm.curriculum_stages  # warmup: one array, easiest first
    key = f"curriculum-{dm.curriculum}-{n_stages}-{'cum' if dm.curriculum_cumulative else 'dis'}"
    d = out / (key + (f"-{ref_sha}" if ref_sha else ""))
    d.mkdir(exist_ok=True)
    tokens = np.load(out / "train.npy", mmap_mode="r")
    bounds = document_bounds(tokens, int(meta["eos_token_id"]))
    if not (d / "stages.json").exists():
        scores = score_documents(dm.curriculum, tokens, bounds, int(meta["vocab_size"]), dm.curriculum_reference,
                                 decode=lambda ids: dm.tokenizer.decode_batch(ids, skip_special_tokens=True))
        lengths = bounds[:, 1] - bounds[:, 0]
        docs = stage_documents(scores, lengths, n_stages, dm.curriculum_cumulative)
        for s, ids in enumerate(docs):
            arr = stage_tokens(tokens, bounds, ids)
            replace_atomically(d / f"stage{s}.npy", lambda f, a=arr: np.save(f, a))
        info = {"scores": scores.tolist(), "stages": [ids.tolist() for ids in docs]}
        replace_atomically(d / "stages.json", lambda f: f.write(json.dumps(info).encode()))  # last: complete
    info = json.loads((d / "stages.json").read_text())
    dm.doc_scores = np.asarray(info["scores"])  # (n_docs,) difficulty of each train document
    dm.stage_docs = [np.asarray(ids) for ids in info["stages"]]  # document ids of each stage
    dm.doc_bounds = bounds
    for s in range(n_stages):
        ds = PackedDataset(d / f"stage{s}.npy", dm.seq_len)
        if len(ds) < dm.batch_size:
            raise ConfigError(
                f"curriculum stage {s} has {len(ds)} blocks of data.seq_len={dm.seq_len}, fewer than "
                f"data.batch_size={dm.batch_size}; use fewer data.curriculum_stages or a smaller batch"
            )
        dm.datasets[f"train_stage{s}"] = ds


def warmup_data(dm) -> tuple[torch.utils.data.Dataset, WarmupSampler]:
    """The train documents sorted easiest first and a sampler that warms up on them in order."""
    ds, trainer = dm.datasets["train_stage0"], dm.trainer
    resumed = bool(getattr(dm, "_resume", None))
    epoch, skip = dm._resume_at()
    if not resumed and trainer is not None:
        epoch = trainer.current_epoch
    per_step = dm.batch_size * (trainer.accumulate_grad_batches * trainer.world_size if trainer else 1)
    total = int(trainer.estimated_stepping_batches) if trainer is not None else len(ds) // per_step
    warmup = max(1, round(dm.curriculum_warmup * total))
    return ds, WarmupSampler(len(ds), dm.seed, warmup, (lambda: trainer.global_step) if trainer is not None else (lambda: 0),
                             per_step, epoch=epoch, skip=skip)


def curriculum_data(dm) -> tuple[torch.utils.data.Dataset, CurriculumSampler]:
    """The concatenated stage datasets and a sampler that follows dm.curriculum_schedule."""
    stages = [dm.datasets[f"train_stage{s}"] for s in range(dm.curriculum_stages)]
    trainer = dm.trainer
    resumed = bool(getattr(dm, "_resume", None))
    epoch, skip = dm._resume_at()
    if not resumed and trainer is not None:
        epoch = trainer.current_epoch
    per_step = dm.batch_size * (trainer.accumulate_grad_batches * trainer.world_size if trainer else 1)
    sampler = CurriculumSampler([len(s) for s in stages], dm.seed, dm.curriculum_schedule,
                                (lambda: trainer.global_step) if trainer is not None else (lambda: 0),
                                per_step, epoch=epoch, skip=skip)
    return torch.utils.data.ConcatDataset(stages), sampler
