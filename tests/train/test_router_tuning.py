"""callbacks.RouterTuning (Router-Tuning / MindSkip, arXiv 2410.13184): a frozen base, only routers train."""

import lightning as L
import pytest
import torch
from helpers import TINY

from callbacks import RouterTuning
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY
from haipai_lightning.train.module import MoRLightningModule

SKIP = {"class_path": "haipai_lightning.MindSkipAttention", "init_args": {"capacity": 0.5}}
ROUTER = {"class_path": "haipai_lightning.ExpertChoiceRouter"}


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, n, T):
        self.x = torch.randint(0, TINY["vocab_size"], (n, T + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i, :-1], "labels": self.x[i, 1:]}


def _base_ckpt(tmp_path, **module_kw):
    base = MoRLightningModule(config=ModelConfig(**TINY), router=ROUTER, **module_kw)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in base.model.state_dict().items()}}
    base.on_save_checkpoint(ckpt)
    path = str(tmp_path / "base.ckpt")
    torch.save(ckpt, path)
    return base, path


def _trainer(tmp_path, cb, steps=3):
    return L.Trainer(default_root_dir=tmp_path, max_steps=steps, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[cb])


def test_router_tuning_freezes_the_base_and_trains_only_the_routers(tmp_path):
    base, path = _base_ckpt(tmp_path)
    tuned = MoRLightningModule(config=ModelConfig(**TINY), mixer=SKIP, router=ROUTER,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))
    grads = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})

    trainer = _trainer(tmp_path, RouterTuning(base_ckpt_path=path))
    trainer.callbacks.append(Spy())
    routers_before = {n: p.detach().clone() for n, p in tuned.model.named_parameters() if "skip_router" in n}
    trainer.fit(tuned, torch.utils.data.DataLoader(_Blocks(12, 16), batch_size=4))
    after = dict(tuned.model.named_parameters())
    for n, p in base.model.named_parameters():  # every base weight bitwise unchanged
        assert torch.equal(after[n], p), n
    assert grads and all("skip_router" in n for n in grads)  # gradients only on the routers
    assert any(not torch.equal(routers_before[n], after[n]) for n in routers_before)  # and they moved


def test_router_tuning_refuses_another_base(tmp_path):
    _, path = _base_ckpt(tmp_path)
    other = MoRLightningModule(config=ModelConfig(**{**TINY, "d_model": 64}), mixer=SKIP, router=ROUTER)
    with pytest.raises(ConfigError, match="another architecture"):
        _trainer(tmp_path, RouterTuning(base_ckpt_path=path)).fit(
            other, torch.utils.data.DataLoader(_Blocks(4, 16), batch_size=4))
    plain = MoRLightningModule(config=ModelConfig(**TINY), router=ROUTER)  # nothing to tune
    with pytest.raises(ConfigError, match="no parameter matches"):
        _trainer(tmp_path, RouterTuning(base_ckpt_path=path)).fit(
            plain, torch.utils.data.DataLoader(_Blocks(4, 16), batch_size=4))
    with pytest.raises(ConfigError, match="regular expression"):
        RouterTuning(trainable="(")


def test_router_tuning_checkpoint_records_the_routed_architecture(tmp_path):
    _, path = _base_ckpt(tmp_path)
    tuned = MoRLightningModule(config=ModelConfig(**TINY), mixer=SKIP, router=ROUTER)
    ckpt = {}
    tuned.on_save_checkpoint(ckpt)
    assert ckpt[CHECKPOINT_KEY]["arch"]["mixer"]["class_path"] == "haipai_lightning.MindSkipAttention"
