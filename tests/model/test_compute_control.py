"""Compute control (issue 20): test-time depth, the budget head, MindSkip attention, learned per-token top-p."""

from functools import partial

import pytest
import torch
from helpers import tiny_config, train_fixed_batch

from haipai_lightning.config import ConfigError
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers.mindskip import MindSkipAttention
from haipai_lightning.model.mlps.moe import AdaptiveTopPMoE
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V = 128
ROUTERS = {"full": FullRecursion, "expert_choice": ExpertChoiceRouter, "token_choice": TokenChoiceRouter}


def _x(B=2, T=24, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _cached(m, x, split=5, **kw):
    c = m.new_cache()
    outs = [m(x[:, :split], cache=c, **kw).logits]
    outs += [m(x[:, t : t + 1], cache=c, **kw).logits for t in range(split, x.size(1))]
    return torch.cat(outs, 1)


# ------------------------------------------------------------------ test-time depth
@pytest.mark.parametrize("name", ROUTERS)
def test_trained_depth_reproduces_the_normal_forward_exactly(name):
    torch.manual_seed(0)
    m = HaipaiModel(tiny_config(), router=ROUTERS[name])
    x = _x()
    for mode in (m.train, m.eval):
        mode()
        torch.manual_seed(1)
        a = m(x).logits
        torch.manual_seed(1)
        assert torch.equal(a, m(x, max_depth=3).logits)


@pytest.mark.parametrize("name", ROUTERS)
def test_extra_recursion_steps_change_the_output_and_decode_with_a_cache(name):
    torch.manual_seed(0)
    m = HaipaiModel(tiny_config(), router=ROUTERS[name]).eval()
    x = _x(2, 12)
    deeper = m(x, max_depth=5)
    assert not torch.allclose(deeper.logits, m(x).logits)
    torch.testing.assert_close(_cached(m, x, max_depth=5), deeper.logits, atol=1e-5, rtol=0)
    if name == "expert_choice":  # extra steps are hierarchical: a token continues only from the previous step
        steps = [r.selected for r in deeper.records if r.is_depth]
        assert len(steps) == 5 and all(bool((b <= a).all()) for a, b in zip(steps, steps[1:]))


def test_token_choice_extra_steps_run_the_deepest_tokens():
    torch.manual_seed(0)
    m = HaipaiModel(tiny_config(), router=TokenChoiceRouter).eval()
    x = _x()
    seen = []
    m.layers[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))  # the shared layer
    out = m(x, max_depth=4)
    deepest = int((out.records[0].selected == 3).sum(1).max())
    assert seen[3] == deepest  # step 4 (extra) ran the tokens of depth Nr, padded to the batch's largest count


def test_extra_depth_needs_a_cycle_strategy():
    m = HaipaiModel(tiny_config(sharing="middle_sequence"))
    with pytest.raises(ConfigError, match="max_depth"):
        m(_x(), max_depth=4)


# ------------------------------------------------------------------ budget head
def _budget_model(router=ExpertChoiceRouter, **cfg):
    torch.manual_seed(0)
    return HaipaiModel(tiny_config(**cfg), router=partial(router, budget={"prefix_len": 4}))


def _realised(out):
    return next(r for r in out.records if r.group == "budget").metrics


@pytest.mark.parametrize("train", [True, False])
def test_requested_budget_changes_realised_mean_depth_monotonically(train):
    m = _budget_model().train(train)
    x = _x(4, 30)
    realised = [float(_realised(m(x, budget=b))["realised"]) for b in (1.0, 1.5, 2.0, 2.5, 3.0)]
    assert all(a <= b for a, b in zip(realised, realised[1:])) and realised[-1] > realised[0]
    if train:  # top-k at the budget's capacities: the requested depth up to one token per step
        req = [float(_realised(m(x, budget=b))["requested"]) for b in (1.5, 2.0, 2.5)]
        assert all(abs(r - q) <= 2 / 30 + 1e-6 for r, q in zip(realised[1:4], req))


def test_budget_sets_the_mixture_of_depths_capacity():
    m = _budget_model(FullRecursion, n_recursions=1, n_layers=4, mod_capacity=0.5, mod_every=1).train()
    x = _x(3, 20)
    for b in (0.25, 0.5, 1.0):
        assert float(_realised(m(x, budget=b))["realised"]) == pytest.approx(b, abs=1 / 20)


def test_budget_head_is_causal_and_cached_decoding_matches():
    m = _budget_model().eval()
    x = _x(2, 14)
    y = x.clone()
    y[:, 10:] = _x(2, 4, seed=5)
    torch.testing.assert_close(m(x).logits[:, :10], m(y).logits[:, :10], atol=1e-6, rtol=0)
    torch.testing.assert_close(_cached(m, x, split=2), m(x).logits, atol=1e-5, rtol=0)
    rec = _realised(m(x))
    assert {"requested", "realised", "budget_error"} <= set(rec)


def test_budget_head_fits_the_loss_curve_and_prices_compute():
    m = _budget_model().train()
    head = m.router.budget_head
    m(_x(8, 12))  # a training forward samples budgets and keeps the head's curve for the fit
    assert head._last is not None and head.fit_loss(torch.ones(8)).requires_grad and head._last is None
    pooled = torch.randn(16, 32)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for i in range(40):  # sequences whose loss falls as 2 / s, at budgets drawn by the head
        s = head.sample(16, pooled.device)
        a, c = head.curve(pooled)
        head._last = (a, c, s)
        fit = head.fit_loss(1.0 + 2.0 / s)
        opt.zero_grad()
        fit.backward()
        opt.step()
        losses.append(fit.item())
    assert losses[-1] < 0.1 * losses[0]
    # the head's choice sqrt(c / price): a higher price buys less compute; compute above target raises it
    c = head.curve(pooled)[1]
    cheap = head.choose(c)
    head.update_price(torch.tensor([3.0]), target=2.0)
    assert float(head.log_price) > 0 and bool((head.choose(c) <= cheap).all())


def test_budget_bad_input():
    with pytest.raises(ConfigError, match="budget"):
        HaipaiModel(tiny_config(), router=partial(ExpertChoiceRouter, budget={"prefix": 4}))
    with pytest.raises(ConfigError, match="mod_capacity"):
        HaipaiModel(tiny_config(), router=partial(FullRecursion, budget={}))
    with pytest.raises(ConfigError, match="budget"):
        HaipaiModel(tiny_config(), router=TokenChoiceRouter)(_x(), budget=2.0)


# ------------------------------------------------------------------ MindSkip attention
def _skip_model(capacity, router=ExpertChoiceRouter):
    torch.manual_seed(0)
    base = HaipaiModel(tiny_config(), router=router)
    m = HaipaiModel(tiny_config(), mixer=partial(MindSkipAttention, capacity=capacity), router=router)
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("skip_router" in k for k in missing)
    return base, m


def test_mindskip_at_capacity_one_is_the_base_model():
    base, m = _skip_model(1.0)
    x = _x()
    for train in (True, False):
        base.train(train), m.train(train)
        torch.testing.assert_close(m(x).logits, base(x).logits, atol=1e-6, rtol=0)


def test_mindskip_realised_capacity_within_one_token_and_cached_decoding():
    base, m = _skip_model(0.3)
    x = _x(2, 20)
    recs = [r for r in m.train()(x).records if r.group == "mindskip"]
    assert len(recs) == 5  # prelude, 3 recursion steps of the shared layer, coda
    for r in recs:
        n = r.selected.size(1)  # the tokens this application saw (a routed step's gathered tokens)
        assert (r.selected.sum(1).float() - 0.3 * n).abs().max() <= 1
    m.eval()
    torch.testing.assert_close(_cached(m, x), m(x).logits, atol=1e-5, rtol=0)


def test_mindskip_saves_attention_rows():
    base, m = _skip_model(0.25, FullRecursion)
    rows = []
    for layer in m.layers:
        layer.mixer.wo.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
    with torch.no_grad():  # (q/k/v may run as one fused matmul, so the output projection is counted)
        m.train()(_x(2, 32))
    assert rows and all(n == 8 for n in rows)  # 8 of 32 tokens run the attention and its projections


# ------------------------------------------------------------------ learned per-token p
def test_learned_p_starts_at_the_layer_threshold_and_learns():
    torch.manual_seed(0)
    cfg = tiny_config()
    fixed = AdaptiveTopPMoE(cfg, n_experts=4, threshold=0.5)
    learned = AdaptiveTopPMoE(cfg, n_experts=4, threshold=0.5, learned_p=True)
    learned.load_state_dict(fixed.state_dict(), strict=False)
    x = torch.randn(2, 16, cfg.d_model)
    rec = []
    torch.testing.assert_close(learned(x, rec), fixed(x), atol=1e-6, rtol=0)
    assert float(rec[0].metrics["p_mean"]) == pytest.approx(0.5, abs=1e-5)
    learned.train()(x, rec).pow(2).sum().backward()
    assert learned.p_predictor.weight.grad.abs().sum() > 0  # the LM side reaches the predictor
    assert "p_mean" in rec[-1].aux_losses and rec[-1].aux_weights["p_mean"] == 1.0
    with pytest.raises(ConfigError, match="p_range"):
        AdaptiveTopPMoE(cfg, threshold=0.99, learned_p=True)


def test_learned_p_model_trains():
    torch.manual_seed(0)
    m = HaipaiModel(tiny_config(), mlp=partial(AdaptiveTopPMoE, n_experts=4, threshold=0.5, learned_p=True))
    losses = train_fixed_batch(m, _x(2, 13), steps=6)
    assert losses[-1] < losses[0]


def test_mindskip_flops_count_the_skipped_attention():
    from haipai_lightning.analysis.flops import forward_flops

    base, full = _skip_model(1.0, FullRecursion)
    _, half = _skip_model(0.5, FullRecursion)
    x = _x(2, 16)
    f_base = forward_flops(base, base.train()(x).records, 2, 16)
    router = 5 * 2 * (2 * 16) * 32  # the routers' linears (d=32) on every token of the 5 applications
    assert forward_flops(full, full.train()(x).records, 2, 16) == pytest.approx(f_base + router)
    f_half = forward_flops(half, half.train()(x).records, 2, 16)
    attn = sum(lin.weight.numel() for lin in base.layers[0].mixer.stream_io()[0] + base.layers[0].mixer.stream_io()[1])
    # 5 attention applications, half of the 32 tokens skip their 4 projections; the attention pairs scale by
    # the routed fraction squared (flops.py's convention for token-routed attention): 136 -> 34 per row
    pairs = 5 * 2 * (16 * 17 / 2) * (1 - 0.25) * 2 * 2 * 32
    assert f_base - f_half == pytest.approx(5 * 2 * 16 * attn + pairs - router)
