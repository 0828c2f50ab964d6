"""Tests of the data pipeline: corpus loading, tokenizer, caching, splitting and packing."""

import json
import re

import datasets
import numpy as np
import pytest
import torch

import datamodules.text as text_mod
from datamodules import TextDataModule
from datamodules.corpus import TXT_DOC_CHARS, load_documents, looks_like_path
from datamodules.text import EpochSeededSampler, split_documents
from datamodules.tokenizer import eos_id, train_tokenizer

# Small and fast: 80 chapters, a 512-token BPE, short blocks.
KW = dict(source="kjv", seq_len=32, batch_size=4, vocab_size=512, max_documents=80, val_fraction=0.05, seed=7)
VERSE_REF = re.compile(r"^\s*\d+:\d+")


@pytest.fixture(scope="module")
def kjv_docs():
    return load_documents("kjv")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def dm(cache_dir):
    m = TextDataModule(**KW, cache_dir=cache_dir)
    m.prepare_data()
    m.setup("fit")
    return m


def split_on_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a flat token array (each one ends with eos)."""
    assert tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 : b].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


# ------------------------------------------------------------------ corpus
def test_kjv_is_offline_one_document_per_chapter(kjv_docs):
    assert len(kjv_docs) == 1189  # chapters in the whole Bible
    assert kjv_docs[0].startswith("In the beginning God created")
    assert kjv_docs[1].startswith("Thus the heavens and the earth were finished")  # Genesis 2
    assert kjv_docs[-1].rstrip().endswith("Amen.")  # end of Revelation
    # No verse references anywhere, neither at line starts nor inline in merged verses.
    assert not any(VERSE_REF.match(line) for doc in kjv_docs for line in doc.splitlines())
    assert not any(re.search(r"\d+:\d+", doc) for doc in kjv_docs)
    # Verses split over two paragraphs in the database keep their second half (Gen 31:49).
    assert any("called Galeed" in doc for doc in kjv_docs)


def test_local_txt_jsonl_parquet_and_combined(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * 100 for i in range(30)]  # ~510 chars each
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(paras) + "\n")
    docs = load_documents(str(big))
    assert 1 < len(docs) < len(paras)  # paragraphs merged, but not into one document
    assert all(len(d) <= TXT_DOC_CHARS for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(p.strip() for p in paras)  # nothing lost or reordered

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("second file")
    (folder / "a.txt").write_text("first file\n\nstill first")
    (folder / "notes.md").write_text("ignored")
    assert load_documents(str(folder)) == ["first file\n\nstill first", "second file"]

    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "one", "x": 1}\n\n{"body": "two"}\n{"body": "  "}\n')
    assert load_documents(str(jl), text_field="body") == ["one", "two"]  # blank docs dropped

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"content": ["alpha", "beta", "gamma"], "id": [1, 2, 3]}).to_parquet(str(pq))
    assert load_documents(str(pq), text_field="content") == ["alpha", "beta", "gamma"]

    combined = load_documents(f"{folder},{pq}", text_field="content")
    assert combined == ["first file\n\nstill first", "second file", "alpha", "beta", "gamma"]


def test_source_kind_detection():
    assert not looks_like_path("kjv") and not looks_like_path("roneneldan/TinyStories")
    for p in ["./x", "~/x", "/abs/x", "a/b/c", "corpus.txt", "d.jsonl", "d.parquet", "d.json"]:
        assert looks_like_path(p), p


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source"):
        load_documents(str(tmp_path / "missing" / "corpus.txt"))
    with pytest.raises(FileNotFoundError, match="data.source"):
        TextDataModule(source="./nope.jsonl", cache_dir=str(tmp_path)).prepare_data()

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(ValueError, match="no text"):
        load_documents(str(empty))
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no text"):
        load_documents(str(empty_dir))

    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "ok"}\n{"content": "wrong key"}\n')
    with pytest.raises(ValueError, match="data.text_field"):
        load_documents(str(jl))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_len=1), "data.seq_len"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(val_fraction=1.0), "data.val_fraction"),
        (dict(val_fraction=0.0), "data.val_fraction"),
        (dict(vocab_size=100), "data.vocab_size"),
        (dict(max_documents=1), "data.max_documents"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TextDataModule(**kwargs)


# --------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(dm, kjv_docs):
    tok = train_tokenizer(kjv_docs[:20], vocab_size=400)
    assert tok.token_to_id("<|endoftext|>") == 0 == eos_id(tok)
    assert tok.token_to_id("<|pad|>") == 1
    sample = "In the beginning, naïve café — 🙂 unseen bytes!\n  two  spaces\tand a tab."
    for t in (tok, dm.tokenizer):
        assert t.decode(t.encode(sample).ids) == sample
    assert dm.eos_token_id == 0
    assert json.loads(dm.tokenizer_json())["model"]["type"] == "BPE"


# ----------------------------------------------------- split, cache, stats
def test_split_is_deterministic_and_disjoint():
    train, val = split_documents(100, 0.1, seed=3)
    train2, val2 = split_documents(100, 0.1, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(val) == 10 and not set(train) & set(val) and set(train) | set(val) == set(range(100))
    assert not np.array_equal(val, split_documents(100, 0.1, seed=4)[1])
    assert len(split_documents(10, 0.001, seed=0)[1]) == 1  # at least one val document


def test_cached_arrays_are_the_split_documents(dm, kjv_docs, tmp_path):
    docs = kjv_docs[: KW["max_documents"]]
    train_idx, val_idx = split_documents(len(docs), KW["val_fraction"], KW["seed"])
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    assert meta["n_documents_val"] == len(val_idx) >= 1
    for split, idx in (("train", train_idx), ("val", val_idx)):
        tokens = np.load(dm.cache_path / f"{split}.npy")
        assert tokens.dtype == np.uint16 and meta[f"n_tokens_{split}"] == len(tokens)
        decoded = [dm.tokenizer.decode(ids) for ids in split_on_eos(tokens, dm.eos_token_id)]
        assert decoded == [docs[i] for i in idx]  # exact documents, in order, EOS-separated
    assert not set(docs[i] for i in train_idx) & set(docs[i] for i in val_idx)

    # Same seed in a fresh cache dir: identical held-out tokens.
    other = TextDataModule(**KW, cache_dir=str(tmp_path))
    other.prepare_data()
    assert np.array_equal(np.load(other.cache_path / "val.npy"), np.load(dm.cache_path / "val.npy"))


def test_second_prepare_reuses_the_cache(dm, cache_dir, monkeypatch):
    files = ["train.npy", "val.npy", "tokenizer.json", "meta.json"]
    before = {f: (dm.cache_path / f).stat().st_mtime_ns for f in files}

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer retrained although the cache is complete")

    monkeypatch.setattr(text_mod, "train_tokenizer", no_training)
    again = TextDataModule(**KW, cache_dir=cache_dir)
    assert again.cache_path == dm.cache_path
    again.prepare_data()
    assert {f: (dm.cache_path / f).stat().st_mtime_ns for f in files} == before
    # Settings that change the data get their own directory.
    assert TextDataModule(**{**KW, "seed": 8}, cache_dir=cache_dir).cache_path != dm.cache_path
    assert TextDataModule(**{**KW, "seq_len": 64}, cache_dir=cache_dir).cache_path == dm.cache_path


def test_interrupted_prepare_is_not_trusted(tmp_path):
    m = TextDataModule(**{**KW, "max_documents": 20}, cache_dir=str(tmp_path))
    m.prepare_data()
    val = np.load(m.cache_path / "val.npy")
    # Simulate a crash after the tokenizer and train array but before val/meta.
    (m.cache_path / "meta.json").unlink()
    (m.cache_path / "val.npy").unlink()
    m2 = TextDataModule(**{**KW, "max_documents": 20}, cache_dir=str(tmp_path))
    m2.setup("fit")  # rebuilds what is missing
    assert np.array_equal(np.load(m.cache_path / "val.npy"), val)
    assert not list(m.cache_path.glob("*.tmp*"))  # no temporary files left behind


def test_unigram_entropy_matches_hand_computation(dm):
    tokens = np.load(dm.cache_path / "train.npy")
    counts = np.bincount(tokens)
    p = counts[counts > 0] / len(tokens)
    assert dm.unigram_entropy == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    assert 0 < dm.unigram_entropy < np.log(dm.vocab_size_actual)
    assert dm.vocab_size_actual == dm.tokenizer.get_vocab_size() <= KW["vocab_size"]


# ----------------------------------------------------------------- packing
def test_blocks_are_shifted_windows_of_the_flat_array(dm):
    T, B = KW["seq_len"], KW["batch_size"]
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        flat = np.load(dm.cache_path / f"{split}.npy").astype(np.int64)
        n_blocks = (len(flat) - 1) // T
        assert len(loader.dataset) == n_blocks
        # Block i starts at i*T; find which block each example is by its input tokens.
        where: dict[bytes, list[int]] = {}
        for i in range(n_blocks):
            where.setdefault(flat[i * T : i * T + T].tobytes(), []).append(i)
        seen = []
        for batch in loader:
            x, y = batch["input_ids"], batch["labels"]
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == T
            for xi, yi in zip(x.numpy(), y.numpy()):
                i = next(i for i in where[xi.tobytes()] if np.array_equal(yi, flat[i * T + 1 : i * T + T + 1]))
                seen.append(i)  # labels are the inputs shifted by one token in the flat array
        if split == "train":  # shuffled, full batches only, no block twice
            assert len(seen) == len(set(seen)) == n_blocks // B * B and seen != sorted(seen)
        else:  # in order, every block
            assert seen == list(range(n_blocks))


def test_train_order_is_deterministic(dm, cache_dir):
    def first_batches(m):
        return [b["input_ids"] for _, b in zip(range(3), m.train_dataloader())]

    fresh = TextDataModule(**KW, cache_dir=cache_dir)
    fresh.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(first_batches(dm), first_batches(fresh)))

    # The order of epoch e depends only on (seed, e): what Lightning needs to resume exactly.
    sampler = EpochSeededSampler(range(50), seed=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1 and sorted(epoch1) == list(range(50))


def test_seq_len_too_large_for_val_split(dm, cache_dir):
    n_val = len(np.load(dm.cache_path / "val.npy"))
    m = TextDataModule(**{**KW, "seq_len": n_val}, cache_dir=cache_dir)  # needs n_val + 1 tokens
    with pytest.raises(ValueError, match=r"val split.*data\.seq_len"):
        m.setup("fit")


def test_local_jsonl_end_to_end(tmp_path):
    rows = [{"text": f"Document number {i}: " + "lorem ipsum dolor sit amet " * 5} for i in range(12)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    m = TextDataModule(source=str(src), seq_len=8, batch_size=2, vocab_size=300, val_fraction=0.2,
                       cache_dir=str(tmp_path / "cache"))
    m.setup("fit")
    texts = [m.tokenizer.decode(d) for d in split_on_eos(np.load(m.cache_path / "val.npy"), m.eos_token_id)]
    assert len(texts) == 2 and all(t in [r["text"] for r in rows] for t in texts)
    assert next(iter(m.train_dataloader()))["input_ids"].shape == (2, 8)
