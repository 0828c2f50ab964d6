"""LMLM data (arXiv 2505.15962): the annotation format, the value mask, and exactly zero gradient on values."""

import json

import numpy as np
import pytest
import torch

from datamodules import TextDataModule
from datamodules.biographies import corpus, people
from datamodules.lmlm import END, ENTITY, MARKERS, RETURN, Fact, call, facts, render, value_mask
from haipai_lightning.train.module import MoRLightningModule
from helpers import tiny_config


def test_call_parse_render_round_trip():
    text = "Ada Byron was born in" + call("Ada Byron", "birthplace", "Leeds") + ". She works as a" + \
        call("ada byron", "occupation", "potter") + "."
    assert facts(text) == [Fact("Ada Byron", "birthplace", "Leeds"), Fact("ada byron", "occupation", "potter")]
    assert render(text) == "Ada Byron was born in Leeds. She works as a potter."
    assert not any(m in render(text) for m in MARKERS)


def test_value_mask_by_hand():
    R, E = 7, 8  # return, end ids
    tokens = np.array([1, 2, R, 3, 4, E, 5, R, 6, E, 9, R, 3])  # the last value runs past the end of the array
    expect = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    assert value_mask(tokens, R, E).astype(int).tolist() == expect


def test_biographies_are_deterministic_and_consistent():
    docs, fs = corpus(10, copies=2, seed=3)
    assert (docs, fs) == corpus(10, copies=2, seed=3) and len(docs) == 20 and len(fs) == 30
    truth = {(f.entity, f.relation): f.value for f in fs}
    for d in docs:  # every call in the text states the person's true fact
        assert all(truth[(f.entity, f.relation)] == f.value for f in facts(d)) and len(facts(d)) == 3
    assert len({n for n, _ in people(100)}) == 100


@pytest.fixture(scope="module")
def lmlm_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmlm")
    docs, _ = corpus(12, copies=2, seed=0)
    (d / "bios.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    dm = TextDataModule(source=str(d / "bios.jsonl"), seq_len=32, batch_size=4, vocab_size=384, lmlm=True,
                        val_fraction=0.1, cache_dir=str(d / "cache"))
    dm.setup()
    return dm


def test_markers_are_single_tokens_and_values_are_masked(lmlm_data):
    dm = lmlm_data
    tok = dm.tokenizer
    ids = {m: tok.token_to_id(m) for m in MARKERS}
    enc = tok.encode("x" + call("Ada Byron", "birthplace", "Leeds"), add_special_tokens=False).ids
    assert [t for t in enc if t in ids.values()] == [ids[m] for m in MARKERS]  # one id each, in order
    ds = dm.datasets["train"]
    flat = np.asarray(ds.tokens, dtype=np.int64)
    n_masked = 0
    for i in range(len(ds)):
        item = ds[i]
        labels, target = item["labels"], torch.from_numpy(flat[i * 32 + 1: i * 32 + 33])
        masked = labels == -100
        assert torch.equal(labels[~masked], target[~masked])  # nothing else changed
        # masked = exactly the targets inside a returned value or its <|db_end|>
        assert torch.equal(masked, torch.from_numpy(value_mask(flat, ids[RETURN], ids[END])[i * 32 + 1: i * 32 + 33]))
        n_masked += int(masked.sum())
    # every value token of the text is masked: the unmasked targets never spell a value
    text = tok.decode(flat.tolist(), skip_special_tokens=False)
    n_values = sum(len(tok.encode(" " + f.value).ids) + 1 for f in facts(text))
    assert n_masked == pytest.approx(n_values, abs=len(ds))  # (block edges: a boundary target is counted once)
    assert dm.datasets["val"][0]["labels"].eq(-100).any()  # validation is scored the same way


def test_value_positions_get_exactly_zero_gradient(lmlm_data):
    dm = lmlm_data
    torch.manual_seed(0)
    module = MoRLightningModule(config=tiny_config(vocab_size=dm.vocab_size_actual))
    batch = next(iter(dm.train_dataloader()))
    kept = []
    def keep(mod, inp, out):  # the logits (B, T, V), kept with their gradient
        out.retain_grad()
        kept.append(out)

    module.model.head.register_forward_hook(keep)
    _, lm, _ = module._loss(batch)  # the training step's loss
    lm.backward()
    grad = kept[-1].grad  # (B, T, V) d loss / d logits
    masked = batch["labels"] == -100
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(grad[masked]) == 0  # exactly zero: the values are not learned
    assert (grad[~masked].abs().sum(-1) > 0).all()  # every other position is
    # the loss is the mean next-token loss over the unmasked targets alone
    logits, labels = kept[-1].detach(), batch["labels"]
    by_hand = torch.nn.functional.cross_entropy(logits[~masked].float(), labels[~masked])
    assert torch.allclose(lm.detach(), by_hand, atol=1e-6)
    assert ENTITY in dm.tokenizer.decode(batch["input_ids"].flatten().tolist(), skip_special_tokens=False)
