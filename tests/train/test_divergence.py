"""A diverging run stops at its first non-finite loss / gradient, before the step is applied
(callbacks.NonFiniteGuard, a `haipai fit` default), and the end-of-fit sample skips a broken model."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import FitSummary, NonFiniteGuard
from fit_probe import fit, read_events, weights_digest
from haipai_lightning.config import TrainingDiverged
from haipai_lightning.io.checkpoint import load_checkpoint_file
from haipai_lightning.train.module import MoRLightningModule
from helpers import tiny_config


def test_lr_1000_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    r = fit(tmp_path, tmp_path / "events.jsonl", tmp_path / "cache", "--model.optimizer.init_args.lr", "1000",
            "--trainer.max_steps", "30", "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", ck,
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_last", "true",
            callbacks=True)  # the quickstart's FitSummary too: it used to fail on the NaN model
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("haipai:")]
    assert len(errors) == 1, errors
    msg = errors[0]
    assert msg.startswith("haipai: error: training diverged at step "), msg
    assert "learning rate" in msg and "gradient clipping" in msg and str(ck / "last.ckpt") in msg
    bad_step = int(msg.split("at step ")[1].split(":")[0])
    assert bad_step > 1

    train, _, saves = read_events(tmp_path / "events.jsonl")
    assert max(train) == bad_step - 1  # the bad step was never completed
    assert max(s for s, _ in saves) == bad_step - 1  # nothing saved after the last good step
    ckpt = load_checkpoint_file(ck / "last.ckpt")
    assert ckpt["global_step"] == bad_step - 1
    weights = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)
    last_digest = [d for s, d in saves if s == bad_step - 1][-1]
    assert math.isfinite(last_digest) and weights_digest(ckpt["state_dict"]) == pytest.approx(last_digest, rel=1e-12)


class Linear(L.LightningModule):
    """Least squares on fixed random data; the loss is NaN at the batches listed in `nan_at` (0-based)."""

    def __init__(self, nan_at=()):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)
        self.nan_at = set(nan_at)

    def training_step(self, batch, batch_idx):
        loss = (self.w(batch[0]) - 1).pow(2).mean()
        return loss * float("nan") if batch_idx in self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(0))), batch_size=1)


class Weights(L.Callback):
    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = pl_module.w.weight.detach().clone()


def _trainer(*callbacks):
    return L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def test_guard_raises_before_the_bad_step_is_applied():
    m, w = Linear(nan_at={2}), Weights()
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3: the training loss is nan; .*learning rate"):
        _trainer(NonFiniteGuard(), w).fit(m)
    assert sorted(w.after) == [1, 2]
    assert torch.equal(m.w.weight, w.after[2])  # the NaN step was not applied
    assert torch.isfinite(m.w.weight).all()


def test_guard_can_skip_a_few_bad_steps():
    m, w = Linear(nan_at={2, 4, 5}), Weights()
    with pytest.raises(TrainingDiverged, match="at step 6"):  # steps 5 and 6: two in a row, one tolerated
        _trainer(NonFiniteGuard(max_nonfinite_steps=1), w).fit(m)
    assert torch.equal(w.after[3], w.after[2])  # step 3 (batch 2) skipped: weights unchanged
    assert not torch.equal(w.after[4], w.after[3])  # and training went on
    assert torch.equal(w.after[5], w.after[4]) and torch.isfinite(m.w.weight).all()


def test_fit_summary_skips_a_non_finite_model(capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "And": 1, "God": 2, "said": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    module = MoRLightningModule(config=tiny_config())
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("nan"))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tok, unigram_entropy=5.0),
                              callback_metrics={"val/loss": torch.tensor(float("nan"))})
    FitSummary(max_new_tokens=5).on_fit_end(trainer, module)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "validation loss nan (the model diverged)"
    assert out[1].startswith("sample: skipped, the model has non-finite weights") and len(out) == 2

    with torch.no_grad():  # finite again: the summary samples as before
        next(module.model.parameters()).fill_(0.01)
    trainer.callback_metrics = {"val/loss": torch.tensor(4.0)}
    FitSummary(max_new_tokens=5).on_fit_end(trainer, module)
    out = capsys.readouterr().out.strip().splitlines()
    assert "vs unigram entropy 5.000 nats: +1.000 nats from context" in out[0] and out[1].startswith("sample: And")
