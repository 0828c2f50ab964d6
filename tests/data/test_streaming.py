"""`haipai prepare` + StreamingDataModule: deterministic shards, any tokenizer, mixtures, ranks, resume."""

import json
import os

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import datamodules.prepare as prep
from datamodules import StreamingDataModule
from datamodules.prepare import iter_documents, load_index, prepare, verify
from datamodules.streaming import permute
from haipai_lightning.cli.prepare import prepare_command
from haipai_lightning.config import ConfigError
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file
from haipai_lightning.io.checkpoint_io import SafeCheckpointIO
from haipai_lightning.train.module import MoRLightningModule
from helpers import tiny_config

KJV = dict(source="kjv", vocab_size=400, bpe_sample_mb=0.3, max_documents=150, shard_tokens=6000, val_fraction=0.05)


def tokens(d, split="train"):
    ix = load_index(d)
    return np.concatenate([np.fromfile(os.path.join(d, s["file"]), dtype=ix["dtype"]) for s in ix["splits"][split]])


@pytest.fixture(scope="module")
def kjv_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("p") / "kjv")
    prepare(**KJV, out=d, workers=1)
    return d


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, kjv_dir):  # same tokenizer, other documents: a second mixture component
    d = str(tmp_path_factory.mktemp("p") / "kjv2")
    prepare(**{**KJV, "max_documents": 60, "seed": 5}, out=d, tokenizer=os.path.join(kjv_dir, "tokenizer.json"))
    return d


def dm(prepared, **kw):
    m = StreamingDataModule(prepared, **{"seq_len": 16, "batch_size": 4, "seed": 3, **kw})
    m.setup("fit")
    return m


def batches(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append(b["input_ids"].clone())
    return out


# ------------------------------------------------------------------ prepare
def test_worker_count_does_not_change_the_shards(kjv_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 20_000)  # many encode tasks, so 3 workers really interleave
    idx3 = prepare(**KJV, out=str(tmp_path / "w3"), workers=3)
    idx1 = load_index(kjv_dir)
    assert idx3 == idx1  # same shards (sha256 per shard), counts, tokenizer
    assert len(idx1["splits"]["train"]) > 3 and idx1["n_tokens"]["val"] > 0
    assert all(s["n_tokens"] == KJV["shard_tokens"] for s in idx1["splits"]["train"][:-1])
    for split in ("train", "val"):
        assert np.array_equal(tokens(kjv_dir, split), tokens(str(tmp_path / "w3"), split))
    verify(kjv_dir)
    # documents are whole, in order, EOS-terminated, and each went to exactly one split
    docs = list(iter_documents("kjv"))[: KJV["max_documents"]]
    train, val = split_docs(kjv_dir, "train"), split_docs(kjv_dir, "val")
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert train == [d for d in docs if d in set(train)]
    assert (len(train), len(val)) == (idx1["n_documents"]["train"], idx1["n_documents"]["val"])


def split_docs(d, split):
    from tokenizers import Tokenizer

    tok, eos = Tokenizer.from_file(os.path.join(d, "tokenizer.json")), load_index(d)["eos_token_id"]
    t = tokens(d, split)
    assert t[-1] == eos
    return [tok.decode(x.tolist()) for x in np.split(t, np.flatnonzero(t == eos) + 1)[:-1]]


def test_parquet_goes_through_the_streaming_reader(tmp_path, monkeypatch):
    rows = [f"Row {i}: " + "the quick brown fox jumps " * (i % 7 + 1) for i in range(40)]
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_dict({"content": rows[:25], "n": list(range(25))}).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_dict({"content": rows[25:], "n": list(range(15))}).to_parquet(str(folder / "b.parquet"))
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert list(iter_documents(str(folder / "*.parquet"), "content")) == rows
    assert calls and all(k["streaming"] for k in calls)  # the Hub code path (streaming=True)
    ix = prepare(str(folder), str(tmp_path / "out"), text_field="content", vocab_size=300, val_fraction=0.0,
                 workers=2)
    assert split_docs(str(tmp_path / "out"), "train") == rows and ix["n_documents"]["train"] == 40


def test_any_tokenizer_json_or_transformers_folder(kjv_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(kjv_dir, "tokenizer.json"))
    folder = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"And God said {i} times"}) for i in range(30)))
    a = prepare(str(src), str(tmp_path / "a"), tokenizer=str(folder), val_fraction=0.0)
    b = prepare(str(src), str(tmp_path / "b"), tokenizer=os.path.join(kjv_dir, "tokenizer.json"), val_fraction=0.0)
    assert a["vocab_size"] == b["vocab_size"] == load_index(kjv_dir)["vocab_size"]
    assert np.array_equal(tokens(str(tmp_path / "a")), tokens(str(tmp_path / "b")))
    assert tokens(str(tmp_path / "a"))[:5].tolist() == tok.encode("And God said 0 times").ids[:5]


# --------------------------------------------------------------- streaming
def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = permute(np.arange(n), n, key=11)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_epoch_is_a_shuffle_new_each_epoch_and_independent_of_workers(kjv_dir):
    m = dm(kjv_dir, num_workers=0)
    s = m.train_stream()
    seen = [blk for b in range(len(s)) for _, blk in s.batch_blocks(b)]
    assert len(seen) == len(set(seen)) == len(s) * 4 and seen != sorted(seen)
    loader = m.train_dataloader()
    e0, e1 = batches(loader), batches(loader)  # iter() twice: epochs 0 and 1
    assert len(e0) == len(loader) and not torch.equal(e0[0], e1[0])
    with_workers = dm(kjv_dir, num_workers=2).train_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(e0[:12], batches(with_workers, 12)))
    # blocks are shifted windows: labels = inputs moved by one token
    b = next(iter(m.train_dataloader()))
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1]) and b["input_ids"].shape == (4, 16)


def test_resume_mid_epoch_gives_the_same_batches(kjv_dir):
    m = dm(kjv_dir)
    loader = m.train_dataloader()
    full = batches(loader) + batches(loader, 5)  # epoch 0, then the start of epoch 1
    m2 = dm(kjv_dir)
    m2.load_state_dict({"epoch": 0, "batches_done": 7, "batch_size": 4, "seq_len": 16})
    loader = m2.train_dataloader()
    rest = batches(loader) + batches(loader, 5)  # the rest of epoch 0, then epoch 1 from its start
    assert len(rest) == len(full) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, full[7:]))
    with pytest.raises(ConfigError, match="data.batch_size"):
        m2.load_state_dict({"epoch": 0, "batches_done": 1, "batch_size": 8})


def test_ranks_see_disjoint_blocks(kjv_dir):
    m = dm(kjv_dir)
    per_rank = []
    for rank in range(2):
        m.rank, m.world_size = rank, 2  # what setup() takes from trainer.global_rank / world_size
        s = m.train_stream()
        per_rank.append({blk for b in range(len(s)) for _, blk in s.batch_blocks(b)})
    assert per_rank[0] and not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) >= m.n_train[0] - 2 * 4 * 2  # together ~the whole epoch


def test_mixture_follows_the_weights(kjv_dir, other_dir):
    m = dm([kjv_dir, other_dir], weights=[0.3, 0.7])
    s = m.train_stream()
    d, k = s.draws(np.arange(10_000))
    assert abs(np.mean(d == 1) - 0.7) < 0.02
    assert np.array_equal(s.draws(np.arange(5000, 10_000))[0], d[5000:])  # random access = sequential
    # the small directory wraps around into a new shuffled pass; the draw counts are consecutive per directory
    for src in (0, 1):
        assert np.array_equal(k[d == src], np.arange((d == src).sum()))
    blocks = s.blocks(np.arange(10_000))
    assert {b for dd, b in blocks if dd == 1} == set(range(m.n_train[1]))
    assert len(s) == sum(m.n_train) // 4 and len(m.val_dataloader().dataset) > 0


# ------------------------------------------------------------ bad input
def test_bad_inputs_are_one_clear_line(kjv_dir, other_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(kjv_dir, broken)
    first = load_index(broken)["splits"]["train"][0]["file"]
    with open(broken / first, "r+b") as f:
        f.truncate(100)
    cases = [(lambda: StreamingDataModule(str(broken)), "truncated or corrupt")]
    missing = tmp_path / "missing"
    shutil.copytree(kjv_dir, missing)
    os.remove(missing / first)
    cases.append((lambda: StreamingDataModule(str(missing)), "is missing"))
    cases.append((lambda: StreamingDataModule(str(tmp_path / "nothing")), "not a prepared directory"))
    cases.append((lambda: StreamingDataModule(kjv_dir, vocab_size=100), "data.vocab_size=100 is smaller"))
    other_tok = tmp_path / "other_tok"
    prepare(**{**KJV, "vocab_size": 300, "max_documents": 20}, out=str(other_tok))
    cases.append((lambda: StreamingDataModule([kjv_dir, str(other_tok)]), "different tokenizers"))
    swapped = tmp_path / "swapped"
    shutil.copytree(other_tok, swapped)
    shutil.copy(os.path.join(kjv_dir, "tokenizer.json"), swapped / "tokenizer.json")  # 400 ids, index says 300
    cases.append((lambda: dm(str(swapped)), "does not match the prepared index"))
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"body": "no text field here"}\n')
    cases.append((lambda: prepare(str(jl), str(tmp_path / "o1")), "no field 'text'"))
    pq = tmp_path / "x.parquet"
    datasets.Dataset.from_dict({"body": ["a", "b"]}).to_parquet(str(pq))
    cases.append((lambda: prepare(str(pq), str(tmp_path / "o2")), "no column 'text'"))
    cases.append((lambda: prepare("kjv", str(tmp_path)), "did not write"))  # a non-prepared directory
    cases.append((lambda: prepare(**KJV, out=kjv_dir), "--overwrite true"))
    cases.append((lambda: prepare("kjv", str(tmp_path / "t"), tokenizer=str(tmp_path / "nope")), "--tokenizer"))
    for make, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            make()
        assert "\n" not in str(e.value), message
    assert load_index(kjv_dir)  # the refused overwrite left it intact


# ------------------------------------------------------------------- fit
class Batches(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = batch["input_ids"].clone()


def _trainer(root, steps, cbs):
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, plugins=[SafeCheckpointIO()],
                     callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True,
                                                every_n_train_steps=3), *cbs])


def test_short_fit_resumes_exactly_and_stores_the_tokenizer(kjv_dir, tmp_path):
    data = lambda: StreamingDataModule(kjv_dir, seq_len=16, batch_size=4, seed=3)  # noqa: E731
    model = lambda: MoRLightningModule(config=tiny_config(vocab_size=data().vocab_size))  # noqa: E731
    full = Batches()
    _trainer(str(tmp_path / "a"), 6, [full]).fit(model(), datamodule=data())
    _trainer(str(tmp_path / "b"), 3, []).fit(model(), datamodule=data())
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    ckpt = load_checkpoint_file(last)
    assert ckpt[CHECKPOINT_KEY]["tokenizer"] == open(os.path.join(kjv_dir, "tokenizer.json")).read()
    resumed = Batches()
    _trainer(str(tmp_path / "b"), 6, [resumed]).fit(model(), datamodule=data(), ckpt_path=str(last))
    assert sorted(resumed.seen) == [3, 4, 5]
    assert all(torch.equal(resumed.seen[s], full.seen[s]) for s in resumed.seen)


def test_prepare_command_parses_and_prints(tmp_path, capsys):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(prepare_command, as_positional=False)
    cfg = parser.parse_args(["--source", "kjv", "--out", str(tmp_path / "o"), "--vocab_size", "300",
                             "--bpe_sample_mb", "0.1", "--max_documents", "20", "--workers", "2", "--verify", "true",
                             "--scores", "[length]"])
    index = prepare_command(**cfg.as_dict())
    assert "use data.prepared=" in capsys.readouterr().out and index["n_documents"]["train"] > 0
    assert load_index(tmp_path / "o")["scores"]["length"][0]["n_tokens"] == index["n_documents"]["train"]


def test_cli_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import haipai_lightning.cli.main as cli_main

    monkeypatch.setattr(cli_main, "_subcommands", lambda: {"prepare": prepare_command})  # the line main.py adds
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"body": "no text field"}\n')
    with pytest.raises(SystemExit) as e:
        cli_main.main(["prepare", "--source", str(jl), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "--text_field" in err

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"^--source 'org/name': reading it with datasets \(streaming\) failed") as e:
        prepare("org/name", str(tmp_path / "hub"), tokenizer=None)
    assert "\n" not in str(e.value)


def test_overwrite_and_the_cli_vocab_link(kjv_dir, tmp_path):
    from datamodules.text import resolve_vocab_size

    out = str(tmp_path / "o")
    small = dict(source="kjv", out=out, vocab_size=300, bpe_sample_mb=0.1, max_documents=20)
    prepare(**small)
    (tmp_path / "o" / "train-00099.bin.tmp").write_bytes(b"half-written")  # a crashed run's leftover
    again = prepare(**small, overwrite=True)
    assert load_index(out) == again and not list((tmp_path / "o").glob("*.tmp"))
    vocab = load_index(kjv_dir)["vocab_size"]
    assert resolve_vocab_size(4096, [kjv_dir]) == 4096 and resolve_vocab_size(None) == 8192
    assert resolve_vocab_size(None, [kjv_dir, out]) == max(vocab, again["vocab_size"])
    assert StreamingDataModule(kjv_dir).vocab_size == vocab == resolve_vocab_size(None, kjv_dir)
    assert resolve_vocab_size(None, None, os.path.join(kjv_dir, "tokenizer.json")) == vocab
