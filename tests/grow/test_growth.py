"""Growth: MoE upcycling, HyperCloning and Gstack preserve (or change as documented) the function,
GrowthSchedule grows inside `fit`, and grown checkpoints resume and load with one call."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import GrowthSchedule
from callbacks.growth import GrowthError
from datamodules import TextDataModule
from haipai_lightning.io.checkpoint import load_checkpoint_file
from haipai_lightning.io.checkpoint_io import SafeCheckpointIO
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.io.loader import load_model
from haipai_lightning.grow.ops import HYPERCLONE_NOISE_BOUND, gstack, hyperclone, upcycle_to_moe
from haipai_lightning.io.arch import arch_of
from haipai_lightning.grow.arch import replay_arch
from haipai_lightning.model.mlps import TokenChoiceMoE
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.train.module import MoRLightningModule
from haipai_lightning.train.schedules import TrapezoidLR
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V = 128


def tiny(router=None, mlp=None, trained=True, **kw):
    base = dict(vocab_size=V, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                n_recursions=3, sharing="middle_cycle")
    model = HaipaiModel(ModelConfig(**{**base, **kw}), mlp=mlp, router=router)
    if trained:  # away from the init, so a wrong scale or mapping cannot hide
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def ids(b=2, t=24):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(7))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------- upcycling
def test_upcycle_uniform_router_is_bit_exact_and_random_router_within_1e6():
    m = tiny(router=ExpertChoiceRouter)
    x = ids()
    ref = logits(m, x)
    for kw in ({"router_std": 0.0}, {"router_std": 0.0, "renormalize": False}):
        g, rep = upcycle_to_moe(m, n_experts=8, top_k=2, **kw)
        # gates exactly 1/2 (renormalised) or experts scaled by E/k = 4 with raw gates 1/8: exact in binary
        assert torch.equal(logits(g, x), ref), kw
        assert rep.max_abs_dlogits == 0.0
    g, rep = upcycle_to_moe(m, n_experts=8, top_k=2)  # default: random router, symmetry broken
    assert rel(logits(g, x), ref) <= 1e-6 and rep.rel_dlogits <= 1e-6
    moe = g.layers[1].mlp
    assert isinstance(moe, TokenChoiceMoE) and moe.top_k == 2 and moe.experts.w1.shape == (8, 32, 64)
    for e in range(8):  # every expert is a copy of the dense MLP
        assert torch.equal(moe.experts.w2[e], m.layers[1].mlp.w2.weight.t())
    assert moe.router.weight.abs().min() > 0
    dense_mlp = sum(p.numel() for p in m.layers[1].mlp.parameters())
    assert rep.params_after["unique"] - rep.params_before["unique"] == 3 * (7 * dense_mlp + 8 * 32)
    with pytest.raises(ConfigError, match="dense SwiGLU"):
        upcycle_to_moe(g)


# ---------------------------------------------------------------------------------- HyperCloning
@pytest.mark.parametrize("tied,router", [(True, ExpertChoiceRouter), (False, TokenChoiceRouter)])
def test_hyperclone_preserves_logits_and_routing(tied, router):
    m = tiny(router=router, tie_embeddings=tied)
    m, _ = upcycle_to_moe(m, n_experts=4, top_k=2)
    x = ids()
    g, rep = hyperclone(m, width_factor=2)
    assert rel(logits(g, x), logits(m, x)) <= 1e-5 and rep.rel_dlogits <= 1e-5
    c = g.cfg
    assert (c.d_model, c.n_heads, c.kv_heads, c.head_dim) == (64, 8, 4, 8)  # head_dim (RoPE) kept
    assert g.layers[1].mlp.experts.w1.shape == (4, 64, 128)
    g.eval(), m.eval()
    with torch.no_grad():  # router logits scaled so routing is unchanged: the same depths / experts
        for a, b in zip(g(x).records, m(x).records):
            assert a.name == b.name and torch.equal(a.selected, b.selected)
            torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)


def test_hyperclone_with_noise_within_documented_bound_and_not_symmetric():
    m = tiny(router=ExpertChoiceRouter)
    x = ids()
    g, rep = hyperclone(m, width_factor=2, noise_snr_db=10.0)
    assert rel(logits(g, x), logits(m, x)) <= HYPERCLONE_NOISE_BOUND
    wq = g.layers[0].mixer.wq.weight  # (2 H hd, 2 D): input copies differ, their sum is the old weight
    assert (wq[:, :32] - wq[:, 32:]).abs().max() > 1e-3
    torch.testing.assert_close(wq[:32, :32] + wq[:32, 32:], m.layers[0].mixer.wq.weight, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="integer"):
        hyperclone(m, width_factor=1.5)


def _head_gap(model, x):
    """max |q_head_i - q_head_{i+H}| / max |q| of layer 0 (H = the old head count)."""
    layer = model.layers[0]
    with torch.no_grad():
        q = layer.mixer.wq(layer.mixer_norm(model.embed(x)))  # (B, T, 2 H hd)
    half = q.size(-1) // 2
    return float((q[..., :half] - q[..., half:]).abs().max() / q.abs().max())


@pytest.mark.parametrize("noise", [None, 20.0])
def test_cloned_heads_diverge_only_with_noise(noise):
    g, _ = hyperclone(tiny(), width_factor=2, noise_snr_db=noise)
    x = ids(4, 24)
    assert _head_gap(g, x) <= 1e-6  # at growth the clones compute the same queries
    opt = torch.optim.AdamW(g.parameters(), lr=1e-2)
    g.train()
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(g(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    gap = _head_gap(g, x)
    if noise is None:
        assert gap <= 1e-6  # no noise: identical gradients, the copies stay copies
    else:
        assert gap > 1e-3  # paired noise breaks the symmetry: the cloned heads diverge


# ------------------------------------------------------------------------------------- Gstack
def _composed(model, x, layer_ids):
    """The old model's layers run in the given order (FullRecursion): the documented function of a Gstack."""
    h = model.embed(x)
    cos, sin = model.rope(torch.arange(x.size(1)))
    for i in layer_ids:
        h = model.layers[i](h, cos, sin)
    return model.head(model.norm(h))


@pytest.mark.parametrize("kw,nr,n_layers,order,new_layers", [
    ({"extra_layers": 2}, 1, 3, [0, 1, 2, 2, 2], 5),  # vanilla: copies of the last layer on top (depth up-scaling)
    ({"extra_layers": 1}, 3, 5, [0] + [1, 1] * 3 + [2], 8),  # MoR: the shared block grows, Nr x 1 layers
    ({"factor": 2}, 3, 8, [0] + [1, 2, 1, 2] * 3 + [3], 14),  # Gstack: the shared block stacked twice
])
def test_gstack_function_change_is_the_documented_composition(kw, nr, n_layers, order, new_layers):
    m = tiny(n_layers=n_layers, n_recursions=nr)
    x = ids()
    g, rep = gstack(m, **kw)
    assert g.cfg.n_layers == new_layers
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(g, x), _composed(m, x, order), atol=1e-5, rtol=1e-5)
    assert rep.max_abs_dlogits > 1e-3  # copying trained layers is not function preserving ...
    gi, rep_i = gstack(m, how="identity", **kw)
    assert torch.equal(logits(gi, x), logits(m, x)) and rep_i.max_abs_dlogits == 0.0  # ... identity copies are
    assert rep_i.params_after["unique"] > rep_i.params_before["unique"]


def test_replayed_architecture_equals_the_grown_model():
    m = tiny(router=ExpertChoiceRouter)
    log = [{"op": "upcycle_to_moe", "args": {"n_experts": 4, "top_k": 2}},
           {"op": "hyperclone", "args": {"width_factor": 2, "noise_snr_db": 20.0}},
           {"op": "gstack", "args": {"extra_layers": 1}}]
    g = m
    from haipai_lightning.grow.ops import grow
    for e in log:
        g, _ = grow(g, e["op"], e["args"])
    assert replay_arch(arch_of(m), log) == arch_of(g)


# ------------------------------------------------------------------------------- in Lightning
DATA = dict(source="kjv", seq_len=16, batch_size=4, vocab_size=512, max_documents=40, val_fraction=0.05, seed=3)
SCHEDULE = [
    {"at_epoch": 1, "op": "upcycle_to_moe", "args": {"n_experts": 4, "top_k": 2}},
    {"at_epoch": 2, "op": "hyperclone", "args": {"width_factor": 2, "noise_snr_db": 20.0}, "lr_scale": 0.5},
    {"at_epoch": 3, "op": "gstack", "args": {"extra_layers": 1}},
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cache"))
    TextDataModule(**DATA, cache_dir=d).prepare_data()
    return d


def module(router=ExpertChoiceRouter):
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                      n_recursions=3, sharing="middle_cycle")
    return MoRLightningModule(config=cfg, router=router,
                              lr_scheduler=lambda o: TrapezoidLR(o, warmup_steps=2, total_steps=8, decay_fraction=0.5))


class LossLog(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(root, cache, max_steps, callbacks, ckpt_path=None, mod=None, val=0):
    mod = mod or module()
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                        limit_val_batches=val, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        plugins=[SafeCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True,
                                                   every_n_train_steps=1), *callbacks])
    trainer.fit(mod, datamodule=TextDataModule(**DATA, cache_dir=cache), ckpt_path=ckpt_path)
    return mod, trainer


@pytest.fixture(scope="module")
def grown_runs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("grow")
    L.seed_everything(0)
    full = LossLog()
    mod, _ = fit(str(root / "full"), cache, 8, [GrowthSchedule(SCHEDULE), full])  # 2 steps per epoch
    return root, full, mod


@pytest.mark.parametrize("stop", [4, 5])  # at the end of epoch 1 (growth comes right after resume) / in epoch 2
def test_grown_run_resumes_with_the_same_losses(grown_runs, cache, stop):
    root, full, mod = grown_runs
    assert [e["op"] for e in mod.growth_log] == ["upcycle_to_moe", "hyperclone", "gstack"]
    assert mod.model.cfg.d_model == 64 and mod.model.cfg.n_layers == 8
    L.seed_everything(0)
    first = LossLog()
    fit(str(root / f"b{stop}"), cache, stop, [GrowthSchedule(SCHEDULE), first])
    last = root / f"b{stop}" / "ckpt" / "last.ckpt"
    assert len(load_checkpoint_file(last)["haipai"]["growth"]) == (1 if stop == 4 else 2)
    L.seed_everything(123)  # resume must not depend on the global seed
    second = LossLog()
    resumed, _ = fit(str(root / f"b{stop}"), cache, 8, [GrowthSchedule(SCHEDULE), second], ckpt_path=str(last))
    losses = {**{k: v for k, v in first.losses.items() if k <= stop}, **second.losses}
    assert sorted(losses) == sorted(full.losses) == list(range(1, 9))
    for step in full.losses:
        assert losses[step] == pytest.approx(full.losses[step], abs=1e-5), step
    assert [(e["op"], e["args"]) for e in resumed.growth_log] == [(e["op"], e["args"]) for e in mod.growth_log]


def test_grown_checkpoint_loads_with_one_call(grown_runs):
    root, _, mod = grown_runs
    last = str(root / "full" / "ckpt" / "last.ckpt")
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = logits(mod.model, x)
    loaded = MoRLightningModule.load_from_checkpoint(last, weights_only=True)
    assert loaded.model.cfg == mod.model.cfg
    assert torch.equal(logits(loaded.model, x), ref)
    model, tok = load_model(last)  # what `haipai generate` uses
    assert torch.equal(logits(model, x), ref) and tok is not None


def test_optimizer_moments_carried_where_exact(cache, tmp_path):
    L.seed_everything(0)
    sched = [{"at_epoch": 1, "op": "gstack", "args": {"extra_layers": 1}}]

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:  # after GrowthSchedule (callbacks run in order)
                opt, named = trainer.optimizers[0], dict(pl_module.model.named_parameters())
                self.new = opt.state[named["layers.2.mixer.wq.weight"]]["exp_avg"].clone()  # copy of layer 1
                self.src = opt.state[named["layers.1.mixer.wq.weight"]]["exp_avg"].clone()
                self.embed = float(opt.state[named["embed.weight"]]["step"])  # 2 steps, carried

    spy = Spy()
    fit(str(tmp_path), cache, 3, [GrowthSchedule(sched), spy])
    assert torch.equal(spy.new, spy.src) and spy.src.abs().max() > 0 and spy.embed == 2


def test_lr_schedule_continues_across_growth(cache, tmp_path):
    # FullRecursion: before upcycling there is no "decay" group; the stacked experts add one
    sched = [{"at_epoch": 1, "op": "upcycle_to_moe", "args": {"n_experts": 4, "top_k": 2}, "lr_scale": 0.5}]

    class Spy(L.Callback):
        lrs = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            self.lrs[trainer.global_step] = {g["name"]: g["lr"] for g in opt.param_groups}
            self.sched = trainer.lr_scheduler_configs[0].scheduler

    spy = Spy()
    fit(str(tmp_path), cache, 4, [GrowthSchedule(sched), spy], mod=module(router=None))
    assert set(spy.lrs[1]) == {"matrix", "no_decay"} and set(spy.lrs[2]) == {"matrix", "decay", "no_decay"}
    assert spy.lrs[0] == {"matrix": 5e-4, "no_decay": 5e-4}  # warm-up step 1 of 2 (default lr 1e-3)
    assert all(v == pytest.approx(0.5e-3) for v in spy.lrs[2].values())  # stable phase, times lr_scale
    assert spy.sched.last_epoch == 4 and spy.sched.base_lrs == pytest.approx([0.5e-3] * 3)


def test_growth_under_galore_carries_low_rank_state(cache, tmp_path):
    """GaLore's low-rank moments are not shaped like their parameter: an unchanged or copied parameter
    keeps them, and growth trains on."""
    from haipai_lightning.train.optimizers import GaLoreAdamW

    L.seed_everything(0)
    sched = [{"at_epoch": 1, "op": "gstack", "args": {"extra_layers": 1}}]
    mod = MoRLightningModule(config=module().config, router=ExpertChoiceRouter,
                             optimizer=lambda groups: GaLoreAdamW(groups, lr=1e-3, rank=4, update_proj_gap=2))

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                opt, named = trainer.optimizers[0], dict(pl_module.model.named_parameters())
                self.state = {k: v.clone() for k, v in opt.state[named["layers.1.mixer.wq.weight"]].items()
                              if isinstance(v, torch.Tensor)}

    spy = Spy()
    fit(str(tmp_path), cache, 3, [GrowthSchedule(sched), spy], mod=mod)
    assert mod.model.cfg.n_layers == 8 and spy.state  # grown, and the shared layer's state was carried
    assert any(v.dim() == 2 and v.shape != (32, 32) for v in spy.state.values())  # low-rank moments


def test_bad_upcycle_argument_fails_before_training():
    with pytest.raises(ConfigError, match="n_expert"):
        GrowthSchedule([{"at_epoch": 1, "op": "upcycle_to_moe", "args": {"n_expert": 8}}])


def test_export_of_a_grown_model_loads(tmp_path):
    from haipai_lightning.io.export import load_pretrained, save_pretrained

    g, _ = upcycle_to_moe(tiny(router=ExpertChoiceRouter), n_experts=4, top_k=2)
    save_pretrained(g, tmp_path / "exp")  # component specs from the grown model's own factories
    loaded = load_pretrained(str(tmp_path / "exp"))[0]
    x = ids()
    assert isinstance(loaded.layers[0].mlp, TokenChoiceMoE) and torch.equal(logits(loaded, x), logits(g, x))


def test_violated_tolerance_restores_the_model_and_raises(cache, tmp_path):
    sched = [{"at_epoch": 1, "op": "gstack", "args": {"extra_layers": 1}, "tolerance": 1e-6}]
    mod = module()
    with pytest.raises(GrowthError, match="over its tolerance"):
        fit(str(tmp_path), cache, 4, [GrowthSchedule(sched)], mod=mod)
    assert mod.growth_log == [] and mod.model.cfg.n_layers == 5
    with pytest.raises(ConfigError, match="op='widen' is unknown"):
        GrowthSchedule([{"at_epoch": 1, "op": "widen"}])
    with pytest.raises(ConfigError, match="exactly one of at_epoch or at_step"):
        GrowthSchedule([{"op": "gstack", "args": {"extra_layers": 1}}])


class GrowOnPlateau(GrowthSchedule):
    """The README example: grow by the next op when val/loss improved by less than min_delta."""

    def __init__(self, ops: list, min_delta: float = 0.0):
        super().__init__()
        self.ops, self.min_delta, self.best = ops, min_delta, float("inf")

    def due(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or len(pl_module.growth_log) >= len(self.ops):
            return None
        plateau = float(loss) > self.best - self.min_delta
        self.best = float("inf") if plateau else float(loss)  # after growing, watch afresh
        return self.ops[len(pl_module.growth_log)] if plateau else None


def test_user_subclass_grows_on_a_val_loss_plateau(cache, tmp_path):
    grow_op = {"op": "gstack", "args": {"extra_layers": 1, "how": "identity"}}
    cb = GrowOnPlateau([grow_op], min_delta=10.0)  # any improvement under 10 nats is a plateau
    mod, trainer = fit(str(tmp_path), cache, 6, [cb], val=1)
    assert [e["op"] for e in mod.growth_log] == ["gstack"] and mod.growth_log[0]["epoch"] == 2
    assert mod.model.cfg.n_layers == 8 and cb.reports[0].max_abs_dlogits == 0.0


# ----------------------------------------------------------------------------------- configs
def _grown_arch(name):
    import yaml
    from pathlib import Path

    from haipai_lightning.io.arch import build_model

    y = yaml.safe_load((Path(__file__).parents[2] / "configs" / name).read_text())
    m = y["model"]
    arch = {"config": {**m["config"], "vocab_size": y["data"]["vocab_size"]}, "mixer": m.get("mixer"),
            "mlp": m.get("mlp"), "router": m.get("router")}
    sched = next(c["init_args"]["schedule"] for c in y["trainer"]["callbacks"] if c["class_path"].endswith("GrowthSchedule"))
    base, grown = build_model(arch, "meta"), build_model(replay_arch(arch, sched), "meta")  # shapes only
    return base, grown


def test_growth_yaml_runs_seed_004s_four_phases():
    base, grown = _grown_arch("growth.yaml")
    assert (base.cfg.d_model, base.cfg.n_layers) == (96, 5) and type(base.layers[0].mlp).__name__ == "SwiGLU"
    c = grown.cfg
    assert (c.d_model, c.n_heads, c.head_dim, c.n_layers) == (192, 8, base.cfg.head_dim, 8)  # x2 width, +3 layers
    moe = grown.layers[1].mlp
    assert isinstance(moe, TokenChoiceMoE) and (moe.n_experts, moe.top_k, moe.experts.hidden) == (8, 2, 512)


def test_stage2_hyperclones_stage1_to_about_1b_effective():
    base, grown = _grown_arch("stage2.yaml")
    assert 150e6 <= base.num_parameters()["unique"] <= 200e6  # stage 1's model
    n = grown.num_parameters()
    assert 1.0e9 <= n["effective"] <= 1.5e9 and n["unique"] >= 500e6, n
    assert grown.cfg.head_dim == base.cfg.head_dim == 64
