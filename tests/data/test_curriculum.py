"""Curriculum: documents scored and staged in order; CurriculumSwitch switches on time, also after a resume."""

import os

import lightning as L
import numpy as np
import pytest
from functools import partial

import torch

from callbacks import CurriculumSwitch, DepthCurriculum
from datamodules import TextDataModule
from datamodules.curriculum import (CurriculumSampler, document_bounds, rare_word_rate, reference_loss,
                                    stage_documents)
from haipai_lightning.io.checkpoint_io import SafeCheckpointIO
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.train.module import MoRLightningModule
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from helpers import tiny_config

DATA = dict(source="kjv", seq_len=32, batch_size=4, vocab_size=512, max_documents=60, val_fraction=0.05, seed=3)


cfg = partial(tiny_config, vocab_size=512)  # the shared tiny model (helpers.TINY) with this file's sizes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache"))
    TextDataModule(**DATA, cache_dir=d).prepare_data()
    return d


def data(cache, **kw):
    return TextDataModule(**DATA, cache_dir=cache, **{"curriculum": "length", **kw})


# ------------------------------------------------------------------------- scoring
def test_rare_word_rate_by_hand():
    # counts: 0 x14, 9 (eos) x3, 1 x2, 2 x1 of 21; 0 alone covers 67% < 80%, with 9 81%: head {0, 9}
    tokens = np.array([0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 2, 9, 0, 0, 0, 0, 0, 0, 1, 0, 9])
    bounds = document_bounds(tokens, eos=9)
    assert bounds.tolist() == [[0, 6], [6, 12], [12, 21]]
    rate = rare_word_rate(tokens, bounds, vocab_size=10, head_mass=0.8)  # rare: 1, 2
    assert rate.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 9])


def test_stages_are_ordered_by_score_with_equal_mass():
    rng = np.random.default_rng(0)
    scores, lengths = rng.random(100), rng.integers(10, 50, 100)
    stages = stage_documents(scores, lengths, 4, cumulative=False)
    for a, b in zip(stages, stages[1:]):
        assert scores[a].max() <= scores[b].min()
    masses = [lengths[s].sum() / lengths.sum() for s in stages]
    assert all(abs(m - 0.25) < 0.05 for m in masses)
    cum = stage_documents(scores, lengths, 4, cumulative=True)
    assert sorted(cum[-1].tolist()) == list(range(100)) and all(set(a) <= set(b) for a, b in zip(cum, cum[1:]))


@pytest.mark.parametrize("kind", ["length", "rare_words"])
def test_data_module_stages_follow_the_score(cache, kind):
    dm = data(cache, curriculum=kind)
    dm.setup()
    bounds, scores = dm.doc_bounds, dm.doc_scores
    if kind == "length":
        assert scores.tolist() == (bounds[:, 1] - bounds[:, 0]).tolist()
    new = [dm.stage_docs[0]] + [np.setdiff1d(b, a) for a, b in zip(dm.stage_docs, dm.stage_docs[1:])]
    for a, b in zip(new, new[1:]):
        assert scores[a].max() <= scores[b].min()  # every document of stage s is easier than stage s+1's new ones
    # cumulative: the last stage is the whole train split
    assert len(dm.datasets["train_stage2"].tokens) == len(dm.datasets["train"].tokens)
    assert len(dm.datasets["train_stage0"]) < len(dm.datasets["train_stage1"]) < len(dm.datasets["train_stage2"])


def test_reference_loss_is_the_checkpoints_mean_nll(cache, tmp_path):
    module = MoRLightningModule(config=cfg())
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = str(tmp_path / "ref.ckpt")
    torch.save(ckpt, path)
    dm = data(cache)
    dm.setup()
    tokens = np.asarray(dm.datasets["train"].tokens)
    bounds = dm.doc_bounds[:3]
    scores = reference_loss(tokens, bounds, path, window=16)
    s, e = bounds[1]
    x = torch.from_numpy(tokens[s:e].astype(np.int64))
    module.eval()
    with torch.no_grad():  # windows of 16 predicted tokens, each starting fresh
        nll = [torch.nn.functional.cross_entropy(module.model(x[a:min(a + 17, len(x))][None, :-1]).logits[0],
                                                 x[a + 1:min(a + 17, len(x))], reduction="sum")
               for a in range(0, len(x) - 1, 16)]
    assert scores[1] == pytest.approx(float(sum(nll)) / (len(x) - 1), rel=1e-4)


def test_sampler_switches_at_the_given_step():
    sizes = [10, 20]
    stage_of = lambda epoch, step: int(step >= 3)  # noqa: E731
    sampler = CurriculumSampler(sizes, seed=0, stage_of=stage_of, first_step=lambda: 1, per_step=2)
    idx = list(sampler)
    assert len(idx) == 10  # an epoch is a permutation of the stage it starts in
    steps = [1 + i // 2 for i in range(10)]
    for i, s in zip(idx, steps):
        assert (i < 10) == (s < 3)  # stage 0 blocks are 0..9, stage 1 blocks 10..29
    assert sorted(idx[:4]) == sorted(set(idx[:4]))


# ---------------------------------------------------------------------- training runs
class Record(L.Callback):
    def __init__(self):
        self.losses, self.stages, self.rows = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.losses[step] = outputs["loss"].item()
        self.stages[step] = int(trainer.callback_metrics["curriculum/stage"])
        self.rows[step] = batch["input_ids"].clone()


def fit(cache, root, max_steps, switch, ckpt_path=None, record=None):
    record = record or Record()
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3,
                        limit_val_batches=0, num_sanity_val_steps=0, plugins=[SafeCheckpointIO()],
                        callbacks=[switch, record, L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=4)])
    torch.manual_seed(0)
    trainer.fit(MoRLightningModule(config=cfg()), datamodule=data(cache), ckpt_path=ckpt_path)
    return trainer, record


def blocks(ds):
    return {tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))}


@pytest.mark.parametrize("mode", ["epochs", "steps"])
def test_switch_on_time_and_after_resume(cache, tmp_path, mode):
    # 3 batches per epoch; stages begin at epochs 1, 2 (steps 3, 6) -- or at steps 5, 7, inside epochs
    make = (lambda: CurriculumSwitch(epochs=[1, 2])) if mode == "epochs" else (lambda: CurriculumSwitch(steps=[5, 7]))
    first = [3, 6] if mode == "epochs" else [5, 7]
    trainer, straight = fit(cache, str(tmp_path / "a"), 9, make())
    expect = {s: int(s >= first[0]) + int(s >= first[1]) for s in range(9)}
    assert straight.stages == expect
    switch = trainer.callbacks[0]
    assert [h["step"] for h in switch.history] == [0, *first]
    dm = trainer.datamodule
    stage_blocks = [blocks(dm.datasets[f"train_stage{s}"]) for s in range(3)]
    for step, rows in straight.rows.items():  # every block trained on comes from the stage in force
        assert all(tuple(r.tolist()) in stage_blocks[expect[step]] for r in rows)
    # stop at step 4 (mid-epoch 1), resume to 9: same stages, same batches, same losses
    fit(cache, str(tmp_path / "b"), 4, make())
    resumed_trainer, resumed = fit(cache, str(tmp_path / "b"), 9, make(),
                                   ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert {s: resumed.stages[s] for s in range(4, 9)} == {s: expect[s] for s in range(4, 9)}
    for s in range(4, 9):
        assert torch.equal(resumed.rows[s], straight.rows[s])
        assert resumed.losses[s] == pytest.approx(straight.losses[s], abs=1e-5)
    assert resumed_trainer.callbacks[0].history == switch.history  # the switches seen, restored and continued


def test_switch_checks_the_stage_count(cache, tmp_path):
    with pytest.raises(ConfigError, match="curriculum_stages"):
        fit(cache, str(tmp_path), 2, CurriculumSwitch(epochs=[1]))
    with pytest.raises(ConfigError, match="exactly one"):
        CurriculumSwitch()
    with pytest.raises(ConfigError, match="data.curriculum"):
        TextDataModule(**DATA, cache_dir=cache, curriculum="nope")


def test_depth_curriculum_grows_capacities(tmp_path):
    T = 12
    caps = [[1.0, 1 / 3, 1 / 6], [1.0, 2 / 3, 1 / 3]]
    seen = {}

    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = [int(r.selected[0].sum()) for r in pl_module.last_records]

    x = torch.randint(0, 512, (16, T + 1))
    loader = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in x], batch_size=2)
    module = MoRLightningModule(config=cfg(), router=ExpertChoiceRouter)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=4, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DepthCurriculum(caps, steps=[2]), Seen()])
    trainer.fit(module, loader)
    assert seen == {0: [12, 4, 2], 1: [12, 4, 2], 2: [12, 8, 4], 3: [12, 8, 4]}  # tokens per step per sequence
    with pytest.raises(ConfigError, match="router's"):
        trainer2 = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             callbacks=[DepthCurriculum([[1, 0.2, 0.1], [1, 0.5, 0.2]], steps=[2])])
        trainer2.fit(MoRLightningModule(config=cfg(), router=ExpertChoiceRouter), loader)
