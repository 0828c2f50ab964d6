"""`haipai prepare`: any corpus -> sharded token files on disk, at constant memory, with N processes.

Layout of a prepared directory (read by datamodules.streaming.StreamingDataModule)::

    tokenizer.json        the tokenizer (trained on the first --bpe_sample_mb MB, or the one given)
    train-00000.bin ...   raw little-endian uint16/uint32 tokens, documents separated by EOS,
    val-00000.bin ...     every shard exactly shard_tokens long except the last of its split
    train-docs-00000.bin  uint64 end offset of every train document in the train stream (curriculum)
    train-scores-*.bin    optional: float64 difficulty per train document (prepared_curriculum.add_scores)
    index.json            format, dtype, vocab, EOS id, tokenizer sha256, per-shard tokens and sha256;
                          written LAST (after every shard was renamed from its .tmp name), so its
                          presence means the directory is complete

Why not litdata (measured 2026-12-02 on this machine): `pip install litdata torch==2.13.0` keeps the
CPU torch but installs torchvision 0.28.0 (a hard requirement of litdata 0.2.76), and with that
torchvision present `import torchmetrics` -- hence `import lightning` -- fails ("operator
torchvision::nms does not exist"). litdata itself imports without torchvision, but a dependency that
pip check reports broken and that breaks Lightning when pip resolves it normally is not acceptable
here; these flat .bin shards + a JSON index need only numpy.

Determinism: documents are read in order by the main process and grouped into batches by a rule
that depends only on the document stream; workers encode batches, results are written in batch
order, shards are cut at fixed token counts and the val split is a hash of the document index. So
the token files are byte-identical for any --workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from datamodules.packed import replace_atomically
from datamodules.sources import iter_documents, resolve_sources  # noqa: F401 (re-exported)
from datamodules.tokenizer import eos_id, id_space, load_tokenizer, train_tokenizer
from haipai_lightning.config import ConfigError

FORMAT = "haipai-stream-v1"
INDEX = "index.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
DOCS = "train-docs"  # train-docs-00000.bin: uint64 end offset of each train document
BATCH_CHARS = 1 << 22  # ~4 MB of text per encode task


# ---------------------------------------------------------------- tokenizer
def resolve_tokenizer(spec: str | None, docs: Iterator[str], vocab_size: int, sample_mb: float):
    """(tokenizers.Tokenizer, eos id, description): a tokenizer.json, a transformers folder or Hub name,
    or None = a byte-level BPE trained on the first ``sample_mb`` MB of documents."""
    if spec is None:
        budget = int(sample_mb * 2**20)

        def sample():
            nonlocal budget
            for d in docs:
                if budget <= 0:
                    return
                budget -= len(d.encode())
                yield d

        tok = train_tokenizer(sample(), vocab_size)
        return tok, eos_id(tok), f"bpe{vocab_size}@{sample_mb}MB"
    p = Path(spec).expanduser()
    if p.is_file():
        try:
            tok = load_tokenizer(p)
        except Exception as e:
            raise ConfigError(f"--tokenizer {spec!r} is not a tokenizers tokenizer.json ({e})") from None
        return tok, eos_id(tok), str(p.resolve())
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--tokenizer {spec!r} is neither a tokenizer.json nor a loadable transformers tokenizer "
                          f"({msg[:200]})") from None
    if not getattr(hf, "is_fast", False):
        raise ConfigError(f"--tokenizer {spec!r} has no fast (tokenizers) version; convert it to tokenizer.json")
    tok = hf.backend_tokenizer
    eos = hf.eos_token_id if hf.eos_token_id is not None else eos_id(tok)
    return tok, int(eos), spec


# ------------------------------------------------------------------ writing
def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash that
    numpy can apply to every index at once (val membership here, the shuffle permutation in streaming.py)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def entropy(counts: np.ndarray) -> float:
    """H = -sum p ln p (nats) of token counts: the loss of the best context-free model."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


def _is_val(index: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Per-document val membership: a hash of (seed, document index), so independent of batching."""
    with np.errstate(over="ignore"):
        x = splitmix64(index.astype(np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_fraction


_TOK = None


def _init_worker(tok_json: str) -> None:
    global _TOK
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_str(tok_json)


def _encode(docs: list[str], val: np.ndarray, eos: int, dtype: str, tok=None) -> tuple[np.ndarray, ...]:
    """(train tokens, val tokens, train document lengths) of one batch, each document followed by EOS.

    encode_batch_fast: the same ids as encode_batch without computing character offsets (~1.7x faster
    here); the ids go into one Python list per split and one numpy conversion (no per-document arrays).
    """
    tok = tok or _TOK
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # tokenizers >= 0.20 has the fast one
    flat: tuple[list[int], list[int]] = ([], [])
    lengths = []
    for e, v in zip(encode(docs, add_special_tokens=False), val):
        ids = e.ids
        ids.append(eos)
        flat[int(v)].extend(ids)
        if not v:
            lengths.append(len(ids))
    return np.array(flat[0], dtype=dtype), np.array(flat[1], dtype=dtype), np.array(lengths, dtype=np.int64)


class ShardWriter:
    """Appends tokens to ``{split}-{i:05d}.bin.tmp``; a full shard is renamed to its final name."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._f, self._n, self._sha = None, 0, None
        self.total = 0  # items written so far

    def write(self, tokens: np.ndarray) -> None:
        self.total += len(tokens)
        while len(tokens):
            if self._f is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._f, self._n, self._sha, self._name = open(self.out / f"{name}.tmp", "wb"), 0, hashlib.sha256(), name
            head, tokens = tokens[: self.shard_tokens - self._n], tokens[self.shard_tokens - self._n :]
            data = head.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._f.write(data)
            self._sha.update(data)
            self._n += len(head)
            if self._n == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.out / f"{self._name}.tmp", self.out / self._name)
        self.shards.append({"file": self._name, "n_tokens": self._n, "sha256": self._sha.hexdigest()})
        self._f = None

    def finish(self) -> list[dict]:
        if self._f is not None:
            self._close()
        return self.shards


def _batches(docs: Iterator[str], max_documents: int | None):
    """(documents, their global indices) in groups of ~BATCH_CHARS characters."""
    batch, size, start = [], 0, 0
    for n, d in enumerate(docs):
        if max_documents is not None and n >= max_documents:
            break
        batch.append(d)
        size += len(d)
        if size >= BATCH_CHARS:
            yield batch, np.arange(start, start + len(batch))
            start, batch, size = start + len(batch), [], 0
    if batch:
        yield batch, np.arange(start, start + len(batch))


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory that is not a prepared one; a prepared one only with overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a new or a prepared directory")
    ours = (*SPLITS, INDEX, TOKENIZER)
    leftovers = [p for p in out.iterdir() if ".tmp" in p.name and p.name.startswith(ours)]  # a crashed run's
    entries = [p for p in out.iterdir() if p not in leftovers]
    if entries and not (out / INDEX).is_file():
        raise ConfigError(f"--out {str(out)!r} is a non-empty directory that `haipai prepare` did not write; "
                          f"refusing to write into it (give a new directory)")
    if entries and not overwrite:
        raise ConfigError(f"--out {str(out)!r} is already prepared; pass --overwrite true to replace it")
    stray = [p.name for p in entries if p.name not in (INDEX, TOKENIZER) and not
             (p.name.startswith(SPLITS) and p.name.endswith(".bin"))]
    if stray:
        raise ConfigError(f"--out {str(out)!r} holds files prepare did not write ({stray[:3]}); refusing to replace it")
    if (out / INDEX).exists():
        (out / INDEX).unlink()  # first: a crash from here on leaves a directory no reader trusts
    for p in entries + leftovers:
        if p.exists():
            p.unlink()


def prepare(source: str, out: str, tokenizer: str | None = None, workers: int = 1, text_field: str = "text",
            vocab_size: int = 8192, bpe_sample_mb: float = 64.0, val_fraction: float = 0.005, seed: int = 1234,
            shard_tokens: int = 1 << 25, max_documents: int | None = None, hub_config: str | None = None,
            overwrite: bool = False) -> dict:
    """Tokenize ``source`` into ``out`` (see the module docstring); returns the index."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 2 or workers < 0:
        raise ConfigError(f"--shard_tokens must be >= 2 and --workers >= 0 (got {shard_tokens}, {workers})")
    dest = Path(out).expanduser()
    check_target(dest, overwrite)
    dest.mkdir(parents=True, exist_ok=True)
    docs = lambda: iter_documents(source, text_field, hub_config=hub_config)  # noqa: E731
    tok, eos, tok_desc = resolve_tokenizer(tokenizer, docs(), vocab_size, bpe_sample_mb)
    tok.no_truncation()
    tok.no_padding()
    tok_json = tok.to_str()
    replace_atomically(dest / TOKENIZER, lambda f: f.write(tok_json.encode()))
    vocab = max(id_space(tok), eos + 1)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    writers = {s: ShardWriter(dest, s, dtype, shard_tokens) for s in SPLITS}
    # the end offset of every train document in the train token stream (curriculum scores, doc masks)
    doc_ends = ShardWriter(dest, DOCS, "uint64", 1 << 62)
    counts = {s: 0 for s in SPLITS}
    unigram = np.zeros(vocab, np.int64)

    def emit(result, val_mask) -> None:
        for split, tokens in zip(SPLITS, result):
            writers[split].write(tokens)
        doc_ends.write(np.cumsum(result[2]) + writers["train"].total - len(result[0]))
        unigram[:] += np.bincount(result[0], minlength=vocab)
        counts["val"] += int(val_mask.sum())
        counts["train"] += int((~val_mask).sum())

    batches = _batches(docs(), max_documents)
    if workers <= 1:
        for batch, idx in batches:
            mask = _is_val(idx, val_fraction, seed)
            emit(_encode(batch, mask, eos, dtype, tok=tok), mask)
    else:  # bounded window of tasks, consumed in submission order: constant memory, deterministic output
        with mp.get_context("fork").Pool(workers, _init_worker, (tok_json,)) as pool:
            pending: deque = deque()
            for batch, idx in batches:
                mask = _is_val(idx, val_fraction, seed)
                pending.append((pool.apply_async(_encode, (batch, mask, eos, dtype)), mask))
                if len(pending) >= 2 * workers:
                    r, m = pending.popleft()
                    emit(r.get(), m)
            while pending:
                r, m = pending.popleft()
                emit(r.get(), m)
    if counts["train"] == 0:
        raise ConfigError(f"--source {source!r} gave no training document (is it empty, or --val_fraction too high?)")
    index = {
        "format": FORMAT, "dtype": dtype, "vocab_size": vocab, "eos_token_id": eos,
        "tokenizer": tok_desc, "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        "source": source, "text_field": text_field, "val_fraction": val_fraction, "seed": seed,
        "shard_tokens": shard_tokens, "n_documents": counts,
        "splits": {s: w.finish() for s, w in writers.items()},
        "docs": {"train": doc_ends.finish()}, "unigram_entropy": entropy(unigram),
    }
    index["n_tokens"] = {s: sum(sh["n_tokens"] for sh in index["splits"][s]) for s in SPLITS}
    replace_atomically(dest / INDEX, lambda f: f.write(json.dumps(index, indent=1).encode()))
    return index


# ------------------------------------------------------------------ reading
def load_index(prepared: str | os.PathLike) -> dict:
    """The index of a prepared directory, checked: every shard present with the size it claims."""
    d = Path(prepared).expanduser()
    if not (d / INDEX).is_file():
        raise ConfigError(f"data.prepared={str(d)!r} is not a prepared directory (no {INDEX}); "
                          f"run `haipai prepare --source ... --out {d}` first (or set data.prepared null to read data.source)")
    try:
        index = json.loads((d / INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{d / INDEX} is corrupt ({e}); prepare the directory again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ConfigError(f"{d / INDEX} is not a {FORMAT} index; prepare the directory again")
    for sh, item in listed_files(index):
        f = d / sh["file"]
        if not f.is_file():
            raise ConfigError(f"shard {str(f)!r} listed in {d / INDEX} is missing; copy it back or prepare again")
        if f.stat().st_size != sh["n_tokens"] * item:
            raise ConfigError(f"shard {str(f)!r} is truncated or corrupt ({f.stat().st_size} bytes, the index says "
                              f"{sh['n_tokens'] * item}); prepare the directory again")
    return index


def listed_files(index: dict) -> list[tuple[dict, int]]:
    """(entry, bytes per item) of every file the index lists: token shards, document ends, scores."""
    item = np.dtype(index["dtype"]).itemsize
    out = [(sh, item) for split in SPLITS for sh in index["splits"].get(split, [])]
    out += [(sh, 8) for sh in index.get("docs", {}).get("train", [])]
    out += [(sh, 8) for shards in index.get("scores", {}).values() for sh in shards]
    return out


def verify(prepared: str | os.PathLike) -> None:
    """Full check: every shard's sha256 against the index (reads everything; `haipai prepare --verify`)."""
    d = Path(prepared).expanduser()
    index = load_index(d)
    for sh, _ in listed_files(index):
        h = hashlib.sha256()
        with open(d / sh["file"], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != sh["sha256"]:
            raise ConfigError(f"shard {str(d / sh['file'])!r} is corrupt (sha256 mismatch); prepare again")
