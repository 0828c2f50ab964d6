"""Mixture-of-Heads attention (arXiv 2410.11842): reduction to multi-head attention, the two-stage gates,
top-k routing, the balance loss and the record."""

from functools import partial

import pytest
import torch
from helpers import attention_twin, mixer_inputs, tiny_config

from haipai_lightning.config import ConfigError
from haipai_lightning.model.mixers import MixtureOfHeadsAttention

B, T = 2, 9


inputs = partial(mixer_inputs, batch=B, length=T)  # (x (B, T, D), cos, sin)


@pytest.mark.parametrize("n_shared", [0, 1, 4])
def test_all_heads_unit_weights_is_multi_head_attention(n_shared):
    cfg = tiny_config()
    moh = MixtureOfHeadsAttention(cfg, n_shared=n_shared, top_k=cfg.n_heads - n_shared, gate_weights=False)
    ref = attention_twin(moh, cfg)
    x, cos, sin = inputs(cfg)
    torch.testing.assert_close(moh(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)


def test_two_stage_gates():
    cfg = tiny_config(n_heads=8, n_kv_heads=2)
    moh = MixtureOfHeadsAttention(cfg, n_shared=2, top_k=3)
    x, _, _ = inputs(cfg)
    g, info = moh.head_gates(x)
    assert g.shape == (B, T, 8)
    assert bool((g[..., :2] > 0).all())  # shared heads always on
    assert bool(((g[..., 2:] > 0).sum(-1) == 3).all())  # exactly top-k routed heads per token
    a = moh.mix(x).softmax(-1)
    torch.testing.assert_close(g[..., :2].sum(-1), a[..., 0], atol=1e-6, rtol=0)  # a_1 softmax(W_s x) sums to a_1
    routed = (info["probs"] * info["active"]).sum(-1) * a[..., 1]
    torch.testing.assert_close(g[..., 2:].sum(-1), routed, atol=1e-6, rtol=0)


def test_inactive_heads_do_not_contribute():
    """Changing the query weights of a head no token selected leaves the output unchanged."""
    cfg = tiny_config(n_heads=4, n_kv_heads=2)
    moh = MixtureOfHeadsAttention(cfg, n_shared=1, top_k=1)
    with torch.no_grad():
        moh.router.weight.zero_()
        moh.router.weight[0] += 10.0 * torch.randn(cfg.d_model).abs()
    x, cos, sin = inputs(cfg)
    x = x.abs()  # routed head 0 (query head 1) wins for every token
    assert bool((moh.head_gates(x)[1]["ids"] == 0).all())
    y0 = moh(x, cos, sin)
    with torch.no_grad():
        moh.wq.weight[3 * cfg.head_dim :] += 1.0  # query head 3: routed, never chosen
    torch.testing.assert_close(moh(x, cos, sin), y0, atol=1e-6, rtol=0)


def test_record_and_balance_loss():
    cfg = tiny_config(n_heads=8, n_kv_heads=2)
    moh = MixtureOfHeadsAttention(cfg, n_shared=2, top_k=2, balance_loss_weight=0.05).train()
    moh.layer_index = 3
    x, cos, sin = inputs(cfg)
    records = []
    moh(x, cos, sin, records=records)
    moh(x, cos, sin, records=records)  # a second application (next recursion step)
    r0, r1 = records
    assert (r0.name, r1.name) == ("moh/layer3/0", "moh/layer3/1")
    assert r0.scores.shape == (B, T, 6) and r0.selected.shape == (B, T, 2)
    bal = r0.aux_losses["balance"]
    assert r0.aux_weights["balance"] == 0.05 and 0.99 < float(bal) < 6.0 + 1e-6  # 1 when uniform, E at most
    bal.backward()
    assert moh.router.weight.grad is not None and moh.router.weight.grad.abs().sum() > 0
    moh.eval()
    rec = []
    moh(x, cos, sin, records=rec)
    assert rec[0].aux_losses == {}  # no loss outside training


def test_balance_loss_pushes_towards_uniform():
    """A router that sends every token to the same heads has a higher balance loss than a uniform one."""
    cfg = tiny_config(n_heads=8, n_kv_heads=2)
    moh = MixtureOfHeadsAttention(cfg, n_shared=0, top_k=1).train()
    x, cos, sin = inputs(cfg)
    with torch.no_grad():
        moh.router.weight.zero_()
    flat = []
    moh(x, cos, sin, records=flat)
    with torch.no_grad():
        moh.router.weight[0] = 5 * x.mean((0, 1)).sign()
    peaked = []
    moh(x.abs().mul(x.mean((0, 1)).sign()), cos, sin, records=peaked)
    assert float(peaked[0].aux_losses["balance"]) > float(flat[0].aux_losses["balance"])


def test_bad_arguments():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="n_shared"):
        MixtureOfHeadsAttention(cfg, n_shared=5)
    with pytest.raises(ConfigError, match="top_k"):
        MixtureOfHeadsAttention(cfg, n_shared=1, top_k=4)
