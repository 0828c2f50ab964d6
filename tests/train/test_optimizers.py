"""Optimizers: GaLore / Q-GaLore / 8-bit AdamW train and hold less state than AdamW (bytes measured)."""

import functools
import io

import lightning as L
import pytest
from functools import partial

import torch
import torch.nn.functional as F

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.train.module import MoRLightningModule
from haipai_lightning.train.schedules import optimizer_state_bytes, param_groups
from haipai_lightning.train.optimizers import AdamW8bit, GaLoreAdamW, QGaLoreAdamW, check_bitsandbytes, dequantize, quantize
from helpers import tiny_config

V, D, R = 128, 64, 8


cfg = partial(tiny_config, vocab_size=V, d_model=D, ffn_hidden=128, max_seq_len=32)  # the shared tiny model (helpers.TINY) with this file's sizes


BATCH = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    out = model(BATCH[:, :-1])
    return F.cross_entropy(out.logits.flatten(0, 1), BATCH[:, 1:].flatten())


def train(make_opt, steps=20, model=None):
    torch.manual_seed(0)
    model = model or HaipaiModel(cfg())
    opt = make_opt(param_groups(model))
    losses = []
    for _ in range(steps):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


ADAMW = functools.partial(torch.optim.AdamW, lr=3e-3)
GALORE = functools.partial(GaLoreAdamW, lr=3e-3, rank=R, update_proj_gap=10, scale=1.0)
QGALORE = functools.partial(QGaLoreAdamW, lr=3e-3, rank=R, update_proj_gap=10, scale=1.0, proj_bits=4)


def test_param_groups_matrix_group_and_no_weight_decay():
    m = HaipaiModel(cfg(mixer_pattern="AM"))
    groups = {g["name"]: g for g in param_groups(m, weight_decay=0.1)}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    # shared recursion weights are one storage: listed once
    assert sum(len(g["params"]) for g in groups.values()) == len({id(p) for p in m.parameters()})
    assert id(m.layers[0].mixer.wq.weight) in ids["matrix"]  # attention
    assert id(m.layers[1].mlp.w1.weight) in ids["matrix"]  # the shared block's MLP
    mamba = m.layers[1].mixer  # the shared block's Mamba ("AM": A | M M M | A)
    assert id(mamba.in_proj.weight) in ids["matrix"]
    assert id(mamba.A_log) in ids["no_decay"] and mamba.A_log.ndim == 2  # 2-D but flagged _no_weight_decay
    assert id(m.embed.weight) in ids["no_decay"] and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["matrix"]["weight_decay"] == 0.1
    assert all(p.ndim == 2 for p in groups["matrix"]["params"])
    from haipai_lightning.model.mlps import TokenChoiceMoE

    moe = HaipaiModel(cfg(), mlp=functools.partial(TokenChoiceMoE, n_experts=4))
    ids = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(moe)}
    assert id(moe.layers[0].mlp.router.weight) in ids["decay"]  # an MoE router is a gate, not a projection


@pytest.mark.parametrize("make", [GALORE, QGALORE], ids=["galore", "qgalore"])
def test_lowrank_optimizers_reduce_the_loss_with_less_state(make):
    _, adam, _ = train(ADAMW, steps=1)
    model, opt, losses = train(make)
    assert losses[-1] < 0.6 * losses[0], losses
    assert optimizer_state_bytes(opt) < 0.5 * optimizer_state_bytes(adam)


def test_galore_state_bytes_by_hand():
    model, opt, _ = train(GALORE, steps=2)
    expect = 0
    for g in opt.param_groups:
        for p in g["params"]:
            if g["name"] == "matrix":
                m, n = p.shape  # std projection: (m, n) -> (m, r) with a (r, n) projection if m >= n
                low = m * R if m >= n else R * n
                expect += 4 * (2 * low + (R * n if m >= n else m * R))
            else:
                expect += 4 * 2 * p.numel()
    assert optimizer_state_bytes(opt) == expect


def test_qgalore_projection_is_int4_and_smaller_than_galore():
    _, g_opt, _ = train(GALORE, steps=2)
    _, q_opt, _ = train(QGALORE, steps=2)
    p = next(p for grp in q_opt.param_groups if grp["name"] == "matrix" for p in grp["params"])
    st = q_opt.state[p]
    assert st["proj_q"].dtype == torch.uint8 and st["exp_avg"].shape[-1] in (R, p.shape[1])
    n_proj = R * min(p.shape)  # the projection holds r x min(m, n) values
    assert st["proj_q"].numel() == -(-n_proj // 2)  # two INT4 codes per byte
    assert optimizer_state_bytes(q_opt) < optimizer_state_bytes(g_opt)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_roundtrip_error_is_half_a_step(bits):
    x = torch.randn(37, 29)
    q, scale = quantize(x, bits, 64)
    y = dequantize(q, scale, bits, 64, x.shape)
    step = (scale.float().max() * 1.001).item()  # one quantization step of the coarsest group
    assert (x - y).abs().max().item() <= 0.5 * step + 1e-3


def test_qgalore_state_survives_bf16_parameters_exactly():
    """torch casts optimizer state to the parameter dtype on load: the INT4 codes and fp16 scales must
    come back bit for bit even for bf16 parameters."""
    model, opt, _ = train(QGALORE, steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = HaipaiModel(cfg()).to(torch.bfloat16)
    opt2 = QGALORE(param_groups(fresh))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    a = [st for st in opt.state.values() if "proj_q" in st]
    b = [st for st in opt2.state.values() if "proj_q" in st]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x["proj_q"], y["proj_q"]) and x["proj_q"].dtype == y["proj_q"].dtype
        assert torch.equal(x["proj_scale"], y["proj_scale"]) and y["proj_scale"].dtype == torch.float16
    assert isinstance(opt.state_dict()["state"][0], dict) and all(
        isinstance(st["proj_scale"], torch.Tensor) for st in a)  # saving left the live state alone


@pytest.mark.parametrize("make", [GALORE, QGALORE], ids=["galore", "qgalore"])
def test_state_dict_round_trip_continues_exactly(make):
    """Save after 8 steps (weights_only load), continue 6: the same weights as 14 straight steps."""
    straight, _, _ = train(make, steps=14)
    model, opt, _ = train(make, steps=8)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = HaipaiModel(cfg())
    fresh.load_state_dict(saved["model"])
    opt2 = make(param_groups(fresh))
    opt2.load_state_dict(saved["opt"])
    for _ in range(6):  # crosses the projection refresh of step 10
        loss = loss_of(fresh)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    for a, b in zip(straight.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_qgalore_lazy_update_doubles_a_stable_gap():
    model, opt, _ = train(functools.partial(QGALORE, update_proj_gap=1, cos_threshold=-1.0, queue_size=2), steps=8)
    st = opt.state[next(p for g in opt.param_groups if g["name"] == "matrix" for p in g["params"])]
    # refreshes at steps 0, 1, 2 (2 stable: gap 2), 4, 6 (2 stable: gap 4)
    assert st["gap"] == 4


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="rank"):
        GaLoreAdamW(param_groups(HaipaiModel(cfg())), rank=0)
    with pytest.raises(ConfigError, match="proj_bits"):
        QGaLoreAdamW(param_groups(HaipaiModel(cfg())), proj_bits=3)
    with pytest.raises(ConfigError, match="target_groups"):
        QGaLoreAdamW(param_groups(HaipaiModel(cfg())), target_groups=["nope"])


def test_adamw8bit_where_bitsandbytes_runs():
    try:
        check_bitsandbytes("cpu")
    except ConfigError as e:
        assert "bitsandbytes" in str(e) and "torch.optim.AdamW" in str(e)
        pytest.skip(f"bitsandbytes does not run here: {e}")
    model, opt, losses = train(functools.partial(AdamW8bit, lr=3e-3))
    assert losses[-1] < 0.6 * losses[0]
    w = model.layers[1].mlp.w1.weight  # 128 x 64 = 8192 values >= min_8bit_size: 8-bit moments
    assert opt.state[w]["state1"].dtype == torch.uint8
    _, adam, _ = train(ADAMW, steps=1)
    assert optimizer_state_bytes(opt) < optimizer_state_bytes(adam)


def test_fused_adamw_runs_on_cpu():
    _, _, losses = train(functools.partial(torch.optim.AdamW, lr=3e-3, fused=True), steps=10)
    assert losses[-1] < losses[0]


class Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": BATCH[i % 2, :-1], "labels": BATCH[i % 2, 1:]}


def test_module_trains_with_qgalore_and_logs_state_bytes(tmp_path):
    module = MoRLightningModule(config=cfg(), optimizer=QGALORE)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(Blocks(), batch_size=4))
    logged = trainer.callback_metrics["train/optimizer_state_bytes"].item()
    assert logged == optimizer_state_bytes(trainer.optimizers[0]) > 0
    assert isinstance(trainer.optimizers[0], QGaLoreAdamW)


def test_cli_selects_galore_by_class_path(tmp_path):
    from haipai_lightning.cli.main import run_cli

    cli = run_cli(["--config", "configs/quickstart.yaml", "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path),
                   "--model.optimizer", "haipai_lightning.GaLoreAdamW",
                   "--model.optimizer.init_args.rank", "16", "--model.optimizer.init_args.lr", "0.002"], run=False)
    opt = cli.model.optimizer_factory(param_groups(cli.model.model))
    assert type(opt).__name__ == "GaLoreAdamW" and type(opt).__module__ != __name__
    assert {g["rank"] for g in opt.param_groups if g["name"] == "matrix"} == {16}
