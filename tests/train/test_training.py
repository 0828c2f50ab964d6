"""Training loop: exact resume, interrupts leave resumable checkpoints, architecture checks."""

import os
import signal

import lightning as L
import pytest
from functools import partial

import torch

from datamodules import TextDataModule
from haipai_lightning.io.checkpoint import load_checkpoint_file
from haipai_lightning.io.checkpoint_io import SafeCheckpointIO
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.train.module import MoRLightningModule
from haipai_lightning.train.schedules import TrapezoidLR
from lightning.pytorch.callbacks import ModelCheckpoint
from helpers import tiny_config

DATA = dict(source="kjv", seq_len=32, batch_size=4, vocab_size=512, max_documents=60, val_fraction=0.05, seed=3)


cfg = partial(tiny_config, vocab_size=512)  # the shared tiny model (helpers.TINY) with this file's sizes


def scheduler(opt):
    return TrapezoidLR(opt, warmup_steps=3, decay_fraction=0.5)


def module(**kw):
    return MoRLightningModule(config=cfg(**kw), lr_scheduler=scheduler)


class LossLog(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


class Stop(L.Callback):
    """Interrupt the run after `step` optimizer steps, by SIGTERM or Ctrl-C."""

    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops at the next batch
            else:
                raise KeyboardInterrupt


def trainer(root, max_steps, callbacks=(), **kw):
    kw = {"limit_train_batches": 8, **kw}
    return L.Trainer(
        default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
        val_check_interval=4, gradient_clip_val=1.0, plugins=[SafeCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True, save_on_exception=True,
                                   every_n_train_steps=1000), *callbacks],
        **kw,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache"))
    dm = TextDataModule(**DATA, cache_dir=d)
    dm.prepare_data()
    return d


def data(cache):
    return TextDataModule(**DATA, cache_dir=cache)


@pytest.mark.parametrize("stop", [6, 8, 11])
def test_resume_continues_the_same_losses(tmp_path, cache, stop):
    # 14 steps cross an epoch boundary (8 batches/epoch); the interrupted run stops in
    # epoch 0, at the end of epoch 0, or in epoch 1.
    L.seed_everything(0)
    full = LossLog()
    trainer(str(tmp_path / "a"), 14, [full]).fit(module(), datamodule=data(cache))

    L.seed_everything(0)
    first = LossLog()
    with pytest.raises(SystemExit):
        trainer(str(tmp_path / "b"), 14, [first, Stop(stop, "sigterm")]).fit(module(), datamodule=data(cache))
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert last.exists()
    ckpt = load_checkpoint_file(last)  # weights_only=True works on what we write
    assert ckpt["global_step"] == stop
    L.seed_everything(123)  # resume must not depend on the global seed
    second = LossLog()
    trainer(str(tmp_path / "b"), 14, [second]).fit(module(), datamodule=data(cache), ckpt_path=str(last))

    resumed = {**{k: v for k, v in first.losses.items() if k <= ckpt["global_step"]}, **second.losses}
    assert sorted(resumed) == sorted(full.losses) == list(range(1, 15))
    for step in full.losses:
        assert resumed[step] == pytest.approx(full.losses[step], abs=1e-5), step


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, cache):
    with pytest.raises(SystemExit):
        trainer(str(tmp_path), 20, [Stop(3, "ctrl-c")]).fit(module(), datamodule=data(cache))
    last = tmp_path / "ckpt" / "last.ckpt"
    assert load_checkpoint_file(last)["global_step"] == 3
    log = LossLog()
    trainer(str(tmp_path), 5, [log]).fit(module(), datamodule=data(cache), ckpt_path=str(last))
    assert sorted(log.losses) == [4, 5]


def test_checkpoint_of_another_architecture_is_refused(tmp_path, cache):
    trainer(str(tmp_path), 2).fit(module(), datamodule=data(cache))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"another architecture: model.config.d_model: checkpoint 32 vs now 64"):
        trainer(str(tmp_path), 4).fit(module(d_model=64), datamodule=data(cache), ckpt_path=last)


def test_checkpoint_holds_only_plain_types_and_the_tokenizer(tmp_path, cache):
    trainer(str(tmp_path), 2).fit(module(), datamodule=data(cache))
    ckpt = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")
    meta = ckpt["haipai"]
    assert meta["arch"]["config"]["d_model"] == 32
    assert meta["arch"]["mixer"] is None and meta["growth"] == []
    assert '"<|endoftext|>"' in meta["tokenizer"]
    # a truncated file gives a one-line error, not a pickle traceback
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((tmp_path / "ckpt" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot be read safely"):
        load_checkpoint_file(bad)


def test_loss_decreases_through_lightning(tmp_path, cache):
    log = LossLog()
    m = MoRLightningModule(config=cfg(), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer(str(tmp_path), 24, [log], limit_train_batches=1.0).fit(m, datamodule=data(cache))
    first, last = sum(list(log.losses.values())[:3]) / 3, sum(list(log.losses.values())[-3:]) / 3
    assert last < first - 0.5


def test_trapezoid_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = TrapezoidLR(opt, warmup_steps=10, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.1, decay_shape="linear")
    f = [s.factor(i) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    assert all(x == 1.0 for x in f[10:80])  # stable
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.55) and f[99] == pytest.approx(0.145)
    with pytest.raises(ValueError, match="decay_fraction"):
        TrapezoidLR(opt, decay_fraction=2.0)
