"""Mixture-of-Recursions routing: counts, hierarchy, gather == brute force, causality, gradients, learning."""

import functools
import math

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from helpers import train_fixed_batch, tiny_config

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.model.rope import apply_rope
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.selection import select_mask, select_topk
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V, T = 61, 24


cfg = partial(tiny_config, vocab_size=V, n_layers=8)  # the shared tiny model (helpers.TINY) with this file's sizes


def ec(**kw):
    return functools.partial(ExpertChoiceRouter, **kw)


def tc(**kw):
    return functools.partial(TokenChoiceRouter, **kw)


ROUTERS = {"ec": ec(), "ec_additive": ec(gating="additive"), "ec_aux_router": ec(aux_router=True), "tc": tc(),
           "tc_bias": tc(bias_balancing=True)}


# ----------------------------------------------------------------- selections
def test_select_mask_pads_at_the_end_in_order():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    sel = select_mask(mask)
    assert sel.idx.tolist() == [[1, 2, 4], [0, 5, 5], [5, 5, 5]]
    assert sel.valid.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert torch.equal(sel.mask(3, mask.device), mask)
    x = torch.arange(15.0).view(3, 5, 1)
    out = sel.scatter(x, sel.gather(x) * 0 - 1)
    assert torch.equal(out.squeeze(-1) == -1, mask)  # only selected rows written
    # composing a selection of a selection maps back to sequence positions
    local = select_mask(torch.tensor([[True, False, True], [False, False, False], [False] * 3]))
    assert sel.sub(local).mask(3, mask.device).tolist()[0] == [False, True, False, False, True]


def test_select_topk_keeps_causal_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert select_topk(scores, 2, 4).idx.tolist() == [[1, 3]]


# ------------------------------------------------------- counts and hierarchy
def test_expert_choice_counts_equal_capacities_and_are_hierarchical():
    m = HaipaiModel(cfg(), router=ec())
    out = m(torch.randint(0, V, (3, T)))
    sel = [r.selected for r in out.records]
    caps = [1, 2 / 3, 1 / 3]
    for s, c in zip(sel, caps):
        assert s.sum(1).tolist() == [math.floor(c * T + 1e-6)] * 3  # per sequence
    for a, b in zip(sel, sel[1:]):
        assert not (b & ~a).any()  # hierarchical: step r+1 only among step-r tokens
    assert [r.aux_weights["bce"] for r in out.records] == [0.001] * 3


def test_capacity_warmup_anneals_to_target():
    r = ExpertChoiceRouter(cfg(), capacity_warmup_steps=10)
    assert r.capacity(2) == pytest.approx(1.0)
    r.steps_seen.fill_(5)
    assert r.capacity(2) == pytest.approx(1 / 3 + (2 / 3) * 0.5)
    r.steps_seen.fill_(10)
    assert r.capacity(2) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="capacities"):
        ExpertChoiceRouter(cfg(), capacities=[1, 0.2, 0.5])


def test_token_choice_depths_define_steps():
    m = HaipaiModel(cfg(), router=tc())
    calls = []
    m.layers[1].register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[1]))
    out = m(torch.randint(0, V, (2, T)))
    depth = out.records[0].selected  # (B, T) in 1..Nr
    counts = [int((depth > r).sum(1).max()) for r in range(3)]  # padded to the largest row
    assert calls == [c for c in counts if c]
    assert 1 <= depth.min() and depth.max() <= 3


# ------------------------------------------------------ gather == brute force
def block_apply(m, x, pos, step):
    """The shared block on one sequence's tokens x (1, n, D) at positions pos (n,)."""
    cos, sin = m.rope(pos)
    lo, hi = m.schedule.step_slices()[step]
    for a in range(lo, hi):
        x = m.layers[m.order[a][0]](x, cos, sin)
    return x


def reference_logits(m, x):
    """Brute force: one sequence at a time, explicit index lists, no padding, no batching."""
    B, n = x.shape
    router = m.router
    h = m.embed(x)
    cos, sin = m.rope(torch.arange(n))
    h = m.layers[0](h, cos, sin)
    rows = []
    for b in range(B):
        hb = h[b].clone()
        active = torch.arange(n)
        if isinstance(router, TokenChoiceRouter):
            depth, gate, _ = router.route(hb[None])
            depth, gate = depth[0], gate[0]
        for r in range(m.cfg.n_recursions):
            if isinstance(router, ExpertChoiceRouter):
                logits = router.gates[r].router(hb[active]).squeeze(-1)
                k = math.floor(router.capacities[r] * n + 1e-6)
                local = logits.topk(k).indices.sort().values
                chosen = active[local]
                xb = hb[chosen][None]
                out = block_apply(m, xb, chosen, r)
                g = router.alpha * torch.sigmoid(logits[local])[None, :, None]
                new = xb + (g * out if router.gating == "weighted" else out)
                active = chosen
            else:
                chosen = torch.nonzero(depth >= r).flatten()
                if len(chosen) == 0:
                    continue
                xb = hb[chosen][None]
                out = block_apply(m, xb, chosen, r)
                new = xb + gate[chosen][None, :, None] * (out - xb)
            hb[chosen] = new[0]
        rows.append(hb)
    h = torch.stack(rows)
    h = m.layers[m.order[-1][0]](h, cos, sin)
    return m.head(m.norm(h))


@pytest.mark.parametrize("name", list(ROUTERS))
def test_gathered_computation_equals_brute_force(name):
    m = HaipaiModel(cfg(), router=ROUTERS[name])
    x = torch.randint(0, V, (3, T))
    ref = reference_logits(m, x)  # first: a training forward nudges the loss-free balancing bias
    torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ec", "tc"])
def test_shared_kv_equals_full_size_masked_reference(name):
    """kv_mode=shared: routed queries over step-1 keys/values == every token's query, rows kept."""
    torch.manual_seed(1)
    m = HaipaiModel(cfg(kv_mode="shared"), router=ROUTERS[name])
    x = torch.randint(0, V, (2, T))
    got = m(x).logits
    # Reference: at steps > 1 run every token (full size, causal mask over step-1 K/V) and keep only
    # the routed rows -- rows of attention and the MLP are independent, so the two must agree.
    # Attention is written out by hand here (no SDPA, no gather).
    h = m.embed(x)
    cos, sin = m.rope(torch.arange(T))
    h = m.layers[0](h, cos, sin)
    kv = {}

    def layer_full(layer, z, slot, reuse):
        att = layer.mixer
        zn = layer.mixer_norm(z)
        B_, n_, _ = z.shape
        q = apply_rope(att.wq(zn).view(B_, n_, att.n_heads, att.head_dim), cos, sin).transpose(1, 2)
        if not reuse:
            k = apply_rope(att.wk(zn).view(B_, n_, att.n_kv_heads, att.head_dim), cos, sin).transpose(1, 2)
            v = att.wv(zn).view(B_, n_, att.n_kv_heads, att.head_dim).transpose(1, 2)
            kv[slot] = (k, v)
        k, v = kv[slot]
        rep = att.n_heads // att.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        w = (q @ k.transpose(-1, -2)) / math.sqrt(att.head_dim)
        w = w.masked_fill(~torch.ones(n_, n_, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        z = z + att.wo((w @ v).transpose(1, 2).reshape(B_, n_, -1))
        return z + layer.mlp(layer.mlp_norm(z))

    router = m.router
    if name == "tc":
        depth, gate, _ = router.route(h)
    active = torch.ones(2, T, dtype=torch.bool)
    for r in range(3):
        lo, hi = m.schedule.step_slices()[r]
        out = h
        for a in range(lo, hi):
            out = layer_full(m.layers[m.order[a][0]], out, a - lo, r > 0)
        if name == "ec":
            logits = router.gates[r].router(h).squeeze(-1).masked_fill(~active, float("-inf"))
            k = math.floor(router.capacities[r] * T + 1e-6)
            chosen = torch.zeros_like(active).scatter(1, logits.topk(k).indices, True)
            g = router.alpha * torch.sigmoid(router.gates[r].router(h))
            new = h + g * out
        else:
            chosen = depth >= r
            new = h + gate[..., None] * (out - h)
        h = torch.where(chosen[..., None], new, h)
        active = chosen
    h = m.layers[m.order[-1][0]](h, cos, sin)
    torch.testing.assert_close(got, m.head(m.norm(h)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ causality
@pytest.mark.parametrize("name,kv,train", [("tc", "recursion_wise", True), ("tc", "shared", True),
                                           ("tc", "recursion_wise", False), ("ec", "recursion_wise", False),
                                           ("ec", "shared", False), ("ec_aux_router", "recursion_wise", False)])
def test_causal_routing(name, kv, train):
    m = HaipaiModel(cfg(kv_mode=kv, mod_capacity=0.5), router=ROUTERS[name]).train(train)
    torch.manual_seed(3)
    x = torch.randint(0, V, (2, T))
    y = x.clone()
    y[:, 15] = (y[:, 15] + 7) % V
    torch.testing.assert_close(m(x).logits[:, :15], m(y).logits[:, :15], atol=1e-6, rtol=1e-6)


def test_expert_choice_topk_training_is_not_causal():
    """Why threshold routing exists: top-k over the sequence lets the future change the past."""
    torch.manual_seed(0)
    m = HaipaiModel(cfg(), router=ec())
    x = torch.randint(0, V, (4, T))
    y = x.clone()
    y[:, 15:] = torch.randint(0, V, (4, T - 15))
    assert not torch.allclose(m(x).logits[:, :15], m(y).logits[:, :15])


def test_threshold_inference_reports_sampling_accuracy_and_generation_works():
    m = HaipaiModel(cfg(mod_capacity=0.25), router=ec()).eval()
    out = m(torch.randint(0, V, (2, T)))
    accs = {r.name: float(r.metrics["sampling_acc"]) for r in out.records if "sampling_acc" in r.metrics}
    assert set(accs) == {"depth/step1", "depth/step2", "mod/layer7"}
    assert all(0 <= a <= 1 for a in accs.values())
    prompt = torch.randint(0, V, (1, 4))
    seq = generate(m, prompt, SamplingConfig(max_new_tokens=5, temperature=0))
    assert seq.shape == (1, 9) and torch.equal(seq[:, :4], prompt)
    # greedy: each new token is the argmax of the causal forward of its prefix
    for t in range(4, 9):
        assert seq[0, t] == m(seq[:, :t]).logits[0, -1].argmax()


# --------------------------------------------------------- gradients, learning
@pytest.mark.parametrize("name", list(ROUTERS))
def test_gradients_reach_every_router(name):
    m = HaipaiModel(cfg(mod_capacity=0.5), router=ROUTERS[name])
    x = torch.randint(0, V, (2, T))
    out = m(x)
    loss = F.cross_entropy(out.logits.flatten(0, 1), x.flatten()) + sum(out.aux_losses.values())
    loss.backward()
    routers = list(m.router.named_parameters()) + list(m.mod_gates.named_parameters())
    assert routers
    for n, p in routers:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name,kv,mod", [("ec", "recursion_wise", 0.0), ("ec", "shared", 0.0),
                                         ("tc", "recursion_wise", 0.0), ("tc", "shared", 0.0),
                                         ("tc_bias", "recursion_wise", 0.0), ("ec", "recursion_wise", 0.25)])
def test_loss_decreases_on_fixed_batch(name, kv, mod):
    torch.manual_seed(0)
    m = HaipaiModel(cfg(kv_mode=kv, mod_capacity=mod), router=ROUTERS[name])
    losses = train_fixed_batch(m, torch.randint(0, V, (4, T + 1)), steps=25)
    assert losses[-1] < 0.6 * losses[0], losses


def test_token_choice_balance_terms():
    m = HaipaiModel(cfg(), router=tc())
    out = m(torch.randint(0, V, (2, T)))
    rec = out.records[0]
    assert set(rec.aux_losses) == {"balance", "z_loss"}
    assert rec.aux_weights == {"balance": 0.1, "z_loss": 1e-5}
    # balance = Nr * sum_i f_i P_i >= 1, equality when uniform
    assert rec.aux_losses["balance"].item() >= 1 - 1e-4
    hm = HaipaiModel(cfg(), router=functools.partial(TokenChoiceRouter, bias_balancing=True))
    hm(torch.randint(0, V, (2, T)))
    assert hm.router.bias.abs().sum() > 0 and "balance" not in hm(torch.randint(0, V, (2, T))).aux_losses


def test_bad_routing_configs():
    with pytest.raises(ConfigError, match="kv_mode=shared .* first capacity must be 1"):
        HaipaiModel(cfg(kv_mode="shared"), router=ec(capacities=[0.5, 0.5, 0.25]))
    with pytest.raises(ConfigError, match="needs a cycle strategy"):
        HaipaiModel(cfg(sharing="middle_sequence"), router=ec())
