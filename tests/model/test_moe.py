"""Mixture-of-Experts MLPs: dense equivalence, balancing terms by hand, capacity, top-p counts,
expert-choice causality, record naming, gradients and learning inside a MoR model."""

import functools
import math

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from helpers import train_fixed_batch, tiny_config

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mlps import AdaptiveTopPMoE, ExpertChoiceMoE, SwiGLU, TokenChoiceMoE
from haipai_lightning.model.routing.losses import balance_loss, max_violation, z_loss
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

V, T = 61, 24


cfg = partial(tiny_config, vocab_size=V)  # the shared tiny model (helpers.TINY) with this file's sizes


def p(cls, **kw):
    return functools.partial(cls, **kw)


MOES = {"token_choice": p(TokenChoiceMoE, n_experts=4),
        "token_choice_bias": p(TokenChoiceMoE, n_experts=4, bias_balancing=True),
        "token_choice_capacity": p(TokenChoiceMoE, n_experts=4, capacity_factor=1.25),
        "expert_choice": p(ExpertChoiceMoE, n_experts=4),
        "expert_choice_threshold": p(ExpertChoiceMoE, n_experts=4, inference="threshold"),
        "top_p": p(AdaptiveTopPMoE, n_experts=4, threshold=0.5)}


def per_token_reference(moe, x, ids, gates):
    """out[n] = sum_j gates[n, j] expert_{ids[n, j]}(x[n]), one token and one expert at a time."""
    ex = moe.experts
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        for e, g in zip(ids[n].tolist(), gates[n]):
            if e >= 0:
                out[n] += g * (F.silu(x[n] @ ex.w1[e]) * (x[n] @ ex.w3[e])) @ ex.w2[e]
    return out


# ----------------------------------------------------------------- equivalences
@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_identical_experts_equal_the_dense_mlp(dispatch):
    """Every expert a copy of a SwiGLU f. Renormalised top-k: sum_j g_j f(x) = f(x) since sum_j g_j = 1.
    Raw gates: (sum of the top-k probabilities) * f(x). Expert choice: (sum of the choosing experts' p) * f(x)."""
    c = cfg()
    dense = SwiGLU(c)
    x = torch.randn(3, T, 32)
    for moe in (TokenChoiceMoE(c, dispatch=dispatch), AdaptiveTopPMoE(c, renormalize=True, dispatch=dispatch)):
        moe.experts.load_dense(dense)
        torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)
    raw = TokenChoiceMoE(c, renormalize=False, dispatch=dispatch)
    raw.experts.load_dense(dense)
    probs = raw.router(x).softmax(-1)
    torch.testing.assert_close(raw(x), probs.topk(2, -1).values.sum(-1, keepdim=True) * dense(x), atol=1e-6, rtol=1e-5)
    ec = ExpertChoiceMoE(c)
    ec.experts.load_dense(dense)
    rec = []
    out = ec(x, rec)
    weight = (rec[0].scores * rec[0].selected).sum(-1, keepdim=True)  # (B, T, 1)
    torch.testing.assert_close(out, weight * dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_sorted_dispatch_equals_per_token_loop(dispatch):
    moe = TokenChoiceMoE(cfg(), n_experts=5, top_k=2, expert_hidden=16, dispatch=dispatch)
    x = torch.randn(1, 13, 32)
    _, _, ids, gates = moe.route(x[0])
    torch.testing.assert_close(moe(x)[0], per_token_reference(moe, x[0], ids, gates), atol=1e-6, rtol=1e-5)
    # gradients flow through the grouped matmul (whose backward needs contiguous gradients)
    moe(x).sum().backward()
    assert moe.experts.w1.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------ balancing terms
def test_balance_z_loss_and_maxvio_by_hand():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]])
    load = torch.tensor([0.5, 0.5, 0.0, 0.0])  # top-1 of each token
    assert balance_loss(load, probs).item() == pytest.approx(4 * (0.5 * 0.4 + 0.5 * 0.4))  # 1.6
    assert balance_loss(torch.full((4,), 0.25), torch.full((3, 4), 0.25)).item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # logsumexp: log 2, log 4
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    assert max_violation(torch.tensor([4.0, 2.0, 1.0, 1.0])).item() == pytest.approx(1.0)  # (4 - 2) / 2
    assert max_violation(torch.ones(4)).item() == 0


def crafted_top1(**kw):
    """4 experts, router 5 * identity, tokens e0, e0, e1, e2: top-1 loads 2, 1, 1, 0."""
    c = cfg(d_model=4, n_heads=1, n_kv_heads=1, ffn_hidden=8)
    moe = TokenChoiceMoE(c, n_experts=4, top_k=1, **kw)
    with torch.no_grad():
        moe.router.weight.copy_(5 * torch.eye(4))
    x = torch.eye(4)[[0, 0, 1, 2]][None]  # (1, 4, 4)
    return moe, x


def test_token_choice_record_matches_hand_values():
    moe, x = crafted_top1()
    rec = []
    moe(x, rec)
    r = rec[0]
    pk = math.exp(5) / (math.exp(5) + 3)  # the chosen expert's probability
    q = 1 / (math.exp(5) + 3)
    P = torch.tensor([2 * pk + 2 * q, pk + 3 * q, pk + 3 * q, 4 * q]) / 4
    load = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert r.selected[0, :, 0].tolist() == [0, 0, 1, 2]
    assert r.aux_losses["balance"].item() == pytest.approx(4 * float((load * P).sum()), rel=1e-5)
    assert r.aux_losses["z_loss"].item() == pytest.approx(math.log(math.exp(5) + 3) ** 2, rel=1e-5)
    assert r.metrics["max_vio"].item() == pytest.approx(1.0)  # (0.5 - 0.25) / 0.25
    assert r.aux_weights == {"balance": 0.01, "z_loss": 1e-3} and r.kind == "moe_token_choice"


def test_capacity_drops_in_training_only_and_bias_balancing():
    moe, x = crafted_top1(capacity_factor=1.0)  # capacity ceil(1 * 4 * 1 / 4) = 1 per expert
    rec = []
    out = moe(x, rec)
    # expert 0 keeps only its first token; tokens 2, 3 are alone on theirs
    assert out[0, 1].abs().sum() == 0 and out[0, 0].abs().sum() > 0 and out[0, 2].abs().sum() > 0
    assert rec[0].metrics["dropped_frac"].item() == pytest.approx(0.25)
    assert rec[0].metrics["expert_rows"].item() == 3
    moe.eval()
    assert moe(x)[0, 1].abs().sum() > 0  # evaluation is dropless
    fb, x = crafted_top1(bias_balancing=True, bias_update_rate=0.1)
    rec = []
    fb(x, rec)
    assert fb.bias.tolist() == pytest.approx([-0.1, 0.0, 0.0, 0.1])  # overloaded down, idle up, mean-loaded kept
    assert "balance" not in rec[0].aux_losses


# ---------------------------------------------------------------------- top-p
def test_top_p_selects_the_documented_number_of_experts():
    c = cfg()
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]])
    # smallest n with p_(1) + ... + p_(n) >= p
    for p_, expect in [(0.4, [1, 1, 2]), (0.6, [2, 2, 3]), (0.9, [3, 3, 4]), (1.0, [4, 4, 4])]:
        moe = AdaptiveTopPMoE(c, n_experts=4, threshold=p_)
        ids = moe.select(probs)
        assert (ids >= 0).sum(-1).tolist() == expect, p_
        assert ids[0, 0] == 0 and ids[1, 0] == 3  # most probable first
    capped = AdaptiveTopPMoE(c, n_experts=4, threshold=0.9, max_experts=2)
    assert (capped.select(probs) >= 0).sum(-1).tolist() == [2] * 3
    # forward reports the mean experts per token it used
    moe = AdaptiveTopPMoE(c, n_experts=4, threshold=0.6)
    x = torch.randn(2, T, 32)
    rec = []
    moe(x, rec)
    n = (moe.select(moe.router(x.reshape(-1, 32)).softmax(-1)) >= 0).sum(-1).float().mean()
    assert rec[0].metrics["mean_experts_per_token"].item() == pytest.approx(n.item())
    assert rec[0].selected.sum(-1).float().mean().item() == pytest.approx(n.item())
    assert set(rec[0].aux_losses) == {"dynamic", "balance"}
    ent = -(rec[0].scores * rec[0].scores.log()).sum(-1).mean()
    assert rec[0].aux_losses["dynamic"].item() == pytest.approx(ent.item(), rel=1e-5)


def test_per_layer_thresholds():
    m = HaipaiModel(cfg(), mlp=p(AdaptiveTopPMoE, n_experts=4, threshold=[0.6, 0.4, 0.2]))  # 3 unique layers
    assert [layer.mlp.threshold for layer in m.layers] == [0.6, 0.4, 0.2]
    out = m(torch.randint(0, V, (2, T)))
    assert [round(r.metrics["threshold"].item(), 3) for r in out.records] == [0.6, 0.4, 0.4, 0.4, 0.2]
    with pytest.raises(ConfigError, match="threshold=.* list of 3"):
        HaipaiModel(cfg(), mlp=p(AdaptiveTopPMoE, threshold=[0.5, 0.5]))


# -------------------------------------------------------------- expert choice
def test_expert_choice_balance_and_causal_inference():
    moe = ExpertChoiceMoE(cfg(), n_experts=4, capacity_factor=2.0)
    x = torch.randn(3, T, 32)
    rec = []
    moe(x, rec)
    sel = rec[0].selected  # (B, T, E)
    assert (sel.sum(1) == math.ceil(2.0 * T / 4)).all()  # every expert exactly c tokens per sequence
    assert rec[0].metrics["max_vio"].item() == 0
    y = x.clone()
    y[:, 15:] = torch.randn(3, T - 15, 32)
    assert not torch.allclose(moe(x)[:, :15], moe(y)[:, :15])  # training routing looks ahead
    moe.eval()
    torch.testing.assert_close(moe(x)[:, :15], moe(y)[:, :15])  # inference: per token, causal
    rec = []
    moe(x, rec)
    assert (rec[0].selected.sum(-1) == 2).all() and 0 <= rec[0].metrics["sampling_acc"] <= 1
    th = ExpertChoiceMoE(cfg(), n_experts=4, inference="threshold")
    rec = []
    th(x, rec)
    assert set(rec[0].aux_losses) == {"z_loss", "bce"}
    th.eval()
    torch.testing.assert_close(th(x)[:, :15], th(y)[:, :15])


# ---------------------------------------------------- inside the MoR model
def test_records_are_unique_per_application():
    m = HaipaiModel(cfg(), mlp=MOES["token_choice"])
    out = m(torch.randint(0, V, (2, T)))
    names = [r.name for r in out.records]
    # unique layers 0 (prelude), 1 (shared, 3 steps), 2 (coda)
    assert names == ["moe/layer0/0", "moe/layer1/0", "moe/layer1/1", "moe/layer1/2", "moe/layer2/0"]
    assert len(out.aux_losses) == 2 * len(names)  # nothing overwritten
    assert out.aux_losses["moe/layer1/2/balance"].item() == pytest.approx(
        0.01 * out.records[3].aux_losses["balance"].item())

    # an MoE inside a Mixture-of-Depths layer still reports its record and aux losses
    m = HaipaiModel(cfg(mod_capacity=0.5), mlp=MOES["token_choice"])
    out = m(torch.randint(0, V, (2, T)))
    names = [r.name for r in out.records]
    assert names == ["moe/layer0/0", "moe/layer1/0", "moe/layer1/1", "moe/layer1/2",  # MoD on the coda (app 4):
                     "moe/layer2/0", "mod/layer4"]
    assert "moe/layer2/0/balance" in out.aux_losses and "mod/layer4/bce" in out.aux_losses


@pytest.mark.parametrize("name", list(MOES))
def test_gradients_reach_routers_and_loss_decreases(name):
    torch.manual_seed(0)
    m = HaipaiModel(cfg(), mlp=MOES[name], router=ExpertChoiceRouter)
    x = torch.randint(0, V, (4, T + 1))

    def routers_get_gradients():
        for layer in m.layers:
            assert layer.mlp.router.weight.grad.abs().sum() > 0
            if getattr(layer.mlp, "predictor", None) is not None:
                assert layer.mlp.predictor.weight.grad.abs().sum() > 0

    losses = train_fixed_batch(m, x, steps=20, after_first_backward=routers_get_gradients)
    assert losses[-1] < 0.7 * losses[0], losses
    m.eval()  # the causal inference paths run inside the model too
    assert torch.isfinite(m(x[:, :-1]).logits).all()
