"""Multi-scale training (#20 item 7): batches of several lengths at equal tokens per step, exact resume."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import StreamingDataModule, TextDataModule
from datamodules.multiscale import check_multiscale, cut, length_at
from datamodules.prepare import prepare
from haipai_lightning.config import ConfigError
from haipai_lightning.io.checkpoint_io import SafeCheckpointIO
from haipai_lightning.train.module import MoRLightningModule
from helpers import tiny_config


@pytest.fixture(scope="module")
def kjv_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ms") / "kjv")
    prepare(source="kjv", out=d, vocab_size=300, bpe_sample_mb=0.1, max_documents=40, val_fraction=0.05)
    return d


def test_cut_is_the_same_next_token_pairs_in_shorter_rows():
    x = torch.arange(4 * 17).reshape(4, 17)  # 4 blocks of seq_len 16 (+1)
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    short = cut(batch, 4)
    assert short["input_ids"].shape == short["labels"].shape == (16, 4)  # 64 tokens either way
    pairs = lambda b: sorted(zip(b["input_ids"].flatten().tolist(), b["labels"].flatten().tolist()))  # noqa: E731
    assert pairs(short) == pairs(batch)  # every next-token pair exactly once, none across a cut
    assert torch.equal(short["labels"][:, :-1], short["input_ids"][:, 1:])  # each row is contiguous text
    assert cut(batch, 16) is not batch and torch.equal(cut(batch, 16)["input_ids"], batch["input_ids"])


def test_lengths_follow_the_schedule_or_a_seeded_mix():
    lens = [4, 8, 16]
    assert [length_at(lens, [10, 20], 0, s, 0) for s in (0, 9, 10, 19, 20, 999)] == [4, 4, 8, 8, 16, 16]
    mix = [length_at(lens, None, 7, 0, i) for i in range(3000)]
    assert mix == [length_at(lens, None, 7, 5, i) for i in range(3000)]  # a function of (seed, batch index)
    assert mix != [length_at(lens, None, 8, 0, i) for i in range(3000)]
    assert all(abs(mix.count(L) / 3000 - 1 / 3) < 0.04 for L in lens)  # uniform
    for lens_, steps, field in (([5], None, "multiscale_lens"), ([4, 8], [3, 2], "multiscale_steps"),
                                ([4, 8], [1, 2], "multiscale_steps"), (None, [3], "multiscale_steps")):
        with pytest.raises(ConfigError, match=field):
            check_multiscale(lens_, steps, 16)
    with pytest.raises(ConfigError, match="divide data.seq_len"):
        TextDataModule(seq_len=16, multiscale_lens=[6])


class Shapes(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = batch["input_ids"].clone()


def _fit(root, steps, data, cbs=(), ckpt=None):
    trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[SafeCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_top_k=-1,
                                                   every_n_train_steps=3, filename="{step}"), *cbs])
    trainer.fit(MoRLightningModule(config=tiny_config(vocab_size=data.vocab_size)), datamodule=data, ckpt_path=ckpt)


def test_a_resumed_multiscale_run_sees_the_same_batches(kjv_dir, tmp_path):
    data = lambda **kw: StreamingDataModule(kjv_dir, seq_len=16, batch_size=4, seed=3, **kw)  # noqa: E731
    full = Shapes()
    _fit(str(tmp_path), 8, data(multiscale_lens=[4, 8, 16]), [full])
    assert {x.numel() for x in full.seen.values()} == {64}  # equal tokens per step
    assert len({x.shape[1] for x in full.seen.values()}) >= 2  # several lengths in one run
    resumed = Shapes()  # from the checkpoint of step 3, as after a crash there
    _fit(str(tmp_path / "b"), 8, data(multiscale_lens=[4, 8, 16]), [resumed], ckpt=str(tmp_path / "ckpt" / "step=3.ckpt"))
    assert sorted(resumed.seen) == list(range(3, 8))
    assert all(torch.equal(resumed.seen[s], full.seen[s]) for s in resumed.seen)  # same lengths, same tokens
    # the tokens are the plain stream's batches, cut into shorter rows
    plain = data()
    plain.setup("fit")
    for s, b in zip(range(8), plain.train_dataloader()):
        assert torch.equal(b["input_ids"].flatten(), full.seen[s].flatten())
