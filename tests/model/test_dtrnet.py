"""DTRNet-style token routing (arXiv 2509.00925): capacity 1 is the dense layer, a bypassed token's output is
W_o W_v x of that token alone, the router's BCE record, and the language-model loss reaching the router."""

from functools import partial

import pytest
import torch
from helpers import attention_twin, mixer_inputs, tiny_config

from haipai_lightning.config import ConfigError
from haipai_lightning.model.mixers import DTRNetAttention

B, T = 3, 10


inputs = partial(mixer_inputs, batch=B, length=T)  # (x (B, T, D), cos, sin)


@pytest.mark.parametrize("window", [None, 4])
def test_capacity_one_is_the_dense_layer(window):
    cfg = tiny_config()
    m = DTRNetAttention(cfg, capacity=1.0, window=window).train()
    ref = attention_twin(m, cfg)
    ref.window = window
    x, cos, sin = inputs(cfg)
    torch.testing.assert_close(m(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)
    m.eval()  # inference: a gate whose logits are all positive routes every token too
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(cfg.d_model), dim=0)
        m.gate.router.weight.copy_(u[None])
        x = x + 20 * u  # every token leans on the gate direction
    assert bool((m.gate.threshold_logit(x) > 0).all())
    torch.testing.assert_close(m(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)


def test_bypassed_token_is_wo_wv_of_itself():
    cfg = tiny_config()
    m = DTRNetAttention(cfg, capacity=0.5).eval()
    x, cos, sin = inputs(cfg)
    with torch.no_grad():
        m.gate.router.weight.normal_(0, 1)
    routed = m.gate.threshold_logit(x) > 0
    assert bool(routed.any()) and not bool(routed.all())
    y = m(x, cos, sin)
    v = m.wv(x).view(B, T, cfg.kv_heads, 1, cfg.head_dim).expand(-1, -1, -1, cfg.n_heads // cfg.kv_heads, -1)
    cheap = m.wo(v.reshape(B, T, -1))
    torch.testing.assert_close(y[~routed], cheap[~routed], atol=1e-6, rtol=0)
    # other tokens changed (routed or not; the gate decides per token): the bypassed outputs stay
    x2 = x + torch.randn_like(x) * routed[..., None]  # perturb the routed tokens only
    y2 = m(x2, cos, sin)
    torch.testing.assert_close(y2[~routed], y[~routed], atol=1e-6, rtol=0)
    assert (y2[routed] - y[routed]).abs().max() > 1e-4


def test_training_routes_capacity_and_records_bce():
    cfg = tiny_config()
    m = DTRNetAttention(cfg, capacity=0.3, aux_loss_weight=0.02).train()
    m.layer_index = 2
    x, cos, sin = inputs(cfg)
    records = []
    y = m(x, cos, sin, records=records)
    (rec,) = records
    assert rec.name == "dtr/layer2/0" and rec.kind == "dtr_expert_choice"
    assert rec.selected.dtype == torch.bool and bool((rec.selected.sum(1) == 3).all())  # floor(0.3 * 10)
    assert rec.aux_weights == {"bce": 0.02} and rec.aux_losses["bce"] > 0
    assert abs(float(rec.metrics["routed_fraction"]) - 0.3) < 1e-6
    y.pow(2).sum().backward()  # the output alone (no aux) trains the router: straight-through factors
    assert m.gate.router.weight.grad.abs().sum() > 0


def test_padded_rows_never_route_pads():
    cfg = tiny_config()
    m = DTRNetAttention(cfg, capacity=1.0).train()
    x, cos, sin = inputs(cfg)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 6:] = False
    records = []
    y = m(x, cos, sin, valid=valid, records=records)
    assert not bool(records[0].selected[0, 6:].any())
    ref = attention_twin(m, cfg)
    torch.testing.assert_close(y[0, :6], ref(x[:1, :6], cos[:6], sin[:6])[0], atol=1e-6, rtol=0)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="capacity"):
        DTRNetAttention(tiny_config(), capacity=0.0)


def test_flops_count_attention_for_the_routed_fraction_only():
    """forward_flops: a DTRNet model costs the dense model minus (1 - c) of the q/k projections and (1 - c^2)
    of the attention pairs, at every layer application (nominal capacity; a record's routed_fraction wins)."""
    from haipai_lightning.analysis.flops import forward_flops
    from haipai_lightning.model.decoder import HaipaiModel
    from haipai_lightning.model.routing.record import RouterRecord

    cfg = tiny_config(n_recursions=1, n_layers=2, sharing="middle_cycle")
    c, n, d_attn = 0.25, 16, cfg.n_heads * cfg.head_dim
    dense = HaipaiModel(cfg)
    dtr = HaipaiModel(cfg, mixer=lambda k: DTRNetAttention(k, capacity=c))
    router = sum(p.numel() for p in dtr.layers[0].mixer.gate.parameters())
    qk = dense.layers[0].mixer.wq.weight.numel() + dense.layers[0].mixer.wk.weight.numel()
    pairs = n * (n + 1) / 2
    per_layer = 2.0 * n * (router - (1 - c) * qk) - 4.0 * pairs * (1 - c * c) * d_attn
    got = forward_flops(dtr, [], 1, n) - forward_flops(dense, [], 1, n)
    assert abs(got - 2 * per_layer) < 1e-6 * abs(per_layer)
    rec = RouterRecord("dtr", "expert_choice", metrics={"routed_fraction": torch.tensor(1.0)}, layer=0, application=0)
    assert forward_flops(dtr, [rec], 1, n) > forward_flops(dtr, [], 1, n)  # layer 0 attended with every token


def test_saturated_gate_stays_finite():
    """A gate logit beyond ~17 makes 1 - sigmoid exactly 0 in float32: the straight-through factors must not
    divide 0 by 0 (the benchmark's capacity-0.5 run went NaN before they were taken in log space)."""
    cfg = tiny_config()
    m = DTRNetAttention(cfg, capacity=0.5).train()
    x, cos, sin = inputs(cfg)
    with torch.no_grad():
        m.gate.router.weight.normal_(0, 100.0)
    assert bool((torch.sigmoid(m.gate.router(x)) == 1).any()) and bool((torch.sigmoid(m.gate.router(x)) == 0).any())
    y = m(x, cos, sin)
    y.pow(2).sum().backward()
    assert bool(torch.isfinite(y).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
