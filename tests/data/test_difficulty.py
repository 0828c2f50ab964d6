"""arXiv 2506.11300's difficulty measures (compression, MTLD, Flesch) and its warm-up pacing."""

import numpy as np
import pytest
import torch

from datamodules import TextDataModule
from datamodules.curriculum import WarmupSampler
from datamodules.difficulty import compression_ratio, flesch_reading_ease, mtld, syllables
from haipai_lightning.config import ConfigError

DATA = dict(source="kjv", seq_len=32, batch_size=4, vocab_size=512, max_documents=60, val_fraction=0.05, seed=3)


def test_flesch_by_hand():
    # 6 words, 1 sentence, 6 syllables: 206.835 - 1.015 * 6 - 84.6 * 1
    assert flesch_reading_ease("The cat sat on the mat.") == pytest.approx(206.835 - 1.015 * 6 - 84.6)
    assert syllables("organisation") >= 4 and syllables("cat") == 1
    # two sentences halve the words per sentence
    two = flesch_reading_ease("The cat sat. On the mat.")
    assert two == pytest.approx(206.835 - 1.015 * 3 - 84.6)
    hard = "Institutional considerations notwithstanding, the organisation deliberated extensively."
    assert flesch_reading_ease(hard) < 0 < flesch_reading_ease("I see a dog. The dog is red.")


def test_mtld_by_hand():
    # all words distinct: TTR never falls to 0.72, the remainder is (1 - 1) / 0.28 = 0 factors -> MTLD = n
    assert mtld("alpha beta gamma delta epsilon") == 5.0
    # "a a": forward TTR after 2 words = 0.5 <= 0.72: one factor of length 2, nothing left -> 2 words / 1 factor
    assert mtld("a a") == 2.0
    # a repeated 2-word cycle: factors of 3 words (ttr 2/3 <= 0.72), both directions
    assert mtld("x y " * 30) == pytest.approx(3.0, rel=0.05)
    distinct = " ".join(chr(97 + i // 26) + chr(97 + i % 26) for i in range(60))  # 60 different words
    assert mtld(distinct) == 60.0 > mtld("x y " * 30)


def test_compression_ratio_orders_redundancy():
    rng = np.random.default_rng(0)
    noise = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, 2000))
    assert compression_ratio("abc " * 500) < 0.05 < 0.5 < compression_ratio(noise)


def _warmup_positions(n, warmup_steps, batch, steps, seed=0, first_step=0, skip=0, epoch=0):
    s = WarmupSampler(n, seed, warmup_steps, lambda: first_step, batch, epoch=epoch, skip=skip)
    return list(s)[: (steps - first_step) * batch]


def test_warmup_batches_are_non_decreasing_then_uniform():
    n, batch, warmup = 4000, 8, 50
    idx = np.array(_warmup_positions(n, warmup, batch, steps=n // batch))
    scores = np.sort(np.random.default_rng(1).random(n))  # blocks are stored easiest first: difficulty of block k
    warm = scores[idx[: warmup * batch]].reshape(warmup, batch)
    assert (np.diff(warm.max(1)) >= 0).all() and (warm[1:].min(1) >= warm[:-1].max(1)).all()  # batch by batch
    assert idx[0] == 0 and idx[warmup * batch - 1] >= n - n // (warmup * batch) - 1  # one sweep, easiest to hardest
    # after the warm-up: uniform over the difficulty deciles (Pearson chi-square, 9 dof)
    after = idx[warmup * batch:]
    counts = np.bincount(after * 10 // n, minlength=10)
    expected = len(after) / 10
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 21.67  # the 0.99 quantile of chi-square(9)
    # and not in difficulty order any more
    assert np.corrcoef(np.arange(len(after)), after)[0, 1] ** 2 < 0.01


def test_warmup_sampler_resumes_exactly():
    n, batch, warmup = 500, 4, 30
    full = _warmup_positions(n, warmup, batch, steps=100)
    resumed = _warmup_positions(n, warmup, batch, steps=100, first_step=20, skip=20 * batch)
    assert resumed == full[20 * batch:]


def test_data_module_warmup_pacing(tmp_path):
    dm = TextDataModule(**DATA, cache_dir=str(tmp_path), curriculum="flesch", curriculum_pacing="warmup",
                        curriculum_warmup=0.5)
    dm.setup()
    # one array of all train documents sorted easiest first, same tokens as the train split
    ds = dm.datasets["train_stage0"]
    assert len(ds.tokens) == len(dm.datasets["train"].tokens)
    order = dm.stage_docs[0]
    assert (np.diff(dm.doc_scores[order]) >= 0).all() and sorted(order.tolist()) == list(range(len(order)))
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WarmupSampler)
    first = next(iter(loader))["input_ids"]
    assert torch.equal(first[0], ds[0]["input_ids"])  # the warm-up starts with the easiest block


@pytest.mark.parametrize("kw, field", [({"curriculum": "mtl"}, "data.curriculum="),
                                       ({"curriculum": "mtld", "curriculum_pacing": "fast"}, "curriculum_pacing"),
                                       ({"curriculum": "mtld", "curriculum_pacing": "warmup", "curriculum_warmup": 1.5},
                                        "curriculum_warmup"),
                                       ({"curriculum": "mtld", "lmlm": True}, "data.lmlm")])
def test_bad_pacing_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        TextDataModule(**DATA, **kw)
