"""The sliding window of routed tokens is over absolute positions: a routed query at position p sees the
keys at positions p - window + 1 .. p among the tokens routed with it (not the last `window` routed
tokens), and FLOP counting counts those pairs."""

import functools
import math

import pytest
import torch

from haipai_lightning import flops
from haipai_lightning.config import ModelConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.rope import RotaryEmbedding, apply_rope
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

V, T, W = 61, 24, 4


def cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                n_recursions=3, sharing="middle_cycle")
    return ModelConfig(**{**base, **kw})


def reference(att, x, pos, valid, window):
    """Attention of gathered tokens x (B, k, D) at positions pos (B, k): real query p sees real keys at
    positions p - window + 1 .. p (explicit loops over rows; pads' outputs are not compared)."""
    B, k, _ = x.shape
    cos, sin = RotaryEmbedding(att.head_dim, 64)(pos)
    q = apply_rope(att.wq(x).view(B, k, att.n_heads, att.head_dim), cos, sin).transpose(1, 2)
    kk = apply_rope(att.wk(x).view(B, k, att.n_kv_heads, att.head_dim), cos, sin).transpose(1, 2)
    v = att.wv(x).view(B, k, att.n_kv_heads, att.head_dim).transpose(1, 2)
    rep = att.n_heads // att.n_kv_heads
    kk, v = kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    qp, kp = pos[:, None, :, None], pos[:, None, None, :]
    see = (kp <= qp) & (kp > qp - window) & valid[:, None, None, :]
    w = ((q @ kk.transpose(-1, -2)) / math.sqrt(att.head_dim)).masked_fill(~see, float("-inf")).softmax(-1)
    return att.wo((w @ v).transpose(1, 2).reshape(B, k, -1))


def test_routed_attention_windows_absolute_positions():
    torch.manual_seed(0)
    att = Attention(cfg(), window=W).eval()
    # two rows of gathered tokens with gaps; the second has 4 real tokens and 2 trailing pads, whose
    # positions repeat the last token's (Selection.gather clamps), as a routed step gathers them
    pos = torch.tensor([[0, 2, 3, 9, 10, 11], [1, 5, 6, 8, 8, 8]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    x = torch.randn(2, 6, 32)
    rope = RotaryEmbedding(att.head_dim, 64)

    def run(x):
        cos, sin = rope(pos)
        return att(x, cos, sin, None, KVShare.at(pos), valid)

    with torch.no_grad():
        y = run(x)
        torch.testing.assert_close(y[valid], reference(att, x, pos, valid, W)[valid], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(y).all()  # pad queries see themselves: no empty softmax row
        # query at position 11 (window 8..11): the key at position 3 is only 2 routed tokens back, but
        # 8 positions back -> no influence; the key at position 9 is inside -> influence
        for slot, inside in ((2, False), (3, True), (1, False)):
            x2 = x.clone()
            x2[0, slot] += 1.0
            changed = (run(x2)[0, 5] - y[0, 5]).abs().max() > 1e-4
            assert bool(changed) == inside, (slot, inside)
        # a real query never sees the pads (whatever they hold)
        x3 = x.clone()
        x3[1, 4:] = 100.0
        torch.testing.assert_close(run(x3)[1, :4], y[1, :4])


def mod_model():
    """One Mixture-of-Depths layer (Nr=1, mod_every=1) with a window: a token's logits depend only on
    the routed tokens within its window (the layer's other input is the token's own embedding)."""
    torch.manual_seed(0)
    c = cfg(n_layers=1, n_recursions=1, mod_capacity=0.5, mod_every=1, init_std=0.2, tie_embeddings=False)
    m = HaipaiModel(c, mixer=functools.partial(Attention, window=W)).eval()
    with torch.no_grad():
        m.mod_gates["0"].router.weight.mul_(40)
    return m


def test_mod_layer_window_follows_positions_in_every_path():
    m = mod_model()
    with torch.no_grad():
        go = m.mod_gates["0"].threshold_logit(m.embed.weight) > 0  # ids that the gate routes (layer input = embedding)
    on, off = go.nonzero().flatten().tolist(), (~go).nonzero().flatten().tolist()
    assert len(on) > 2 and len(off) > 2
    routed_at = {0, 3, 10, 11, 12, 20}
    ids = torch.tensor([[on[0] if p in routed_at else off[0] for p in range(T)]])

    def logits(x):
        with torch.no_grad():
            full = m(x).logits
            cache = m.new_cache()
            steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(T)], 1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)  # cached decoding: the same window
        return full

    base = logits(ids)
    sel = [r.selected for r in m(ids).records if r.group == "mod"][0]
    assert sel[0].nonzero().flatten().tolist() == sorted(routed_at)
    # query at 12, window 9..12: the routed token at 3 is the 4th-last routed one but 9 positions back
    for p, new, inside in ((3, on[1], False), (10, on[1], True), (9, off[1], False), (8, on[1], False),
                           (9, on[1], True)):
        x = ids.clone()
        x[0, p] = new
        changed = (logits(x)[0, 12] - base[0, 12]).abs().max() > 1e-4
        assert bool(changed) == inside, (p, new, inside)


def test_flops_count_absolute_window_pairs():
    """Routed steps and MoD layers under a window: (query, key) pairs with the key routed too and at most
    window - 1 positions back, so the FLOP gap to the same model without a window is exactly those pairs."""
    torch.manual_seed(0)
    m = HaipaiModel(cfg(mod_capacity=0.5, mod_every=1), mixer=functools.partial(Attention, window=W),
                    router=ExpertChoiceRouter)
    B = 2
    out = m(torch.randint(0, V, (B, T)))
    steps, mod = flops.step_masks(m, out.records, B, T)

    def pairs(mask, w):
        return sum(int(mask[b, q] and mask[b, k]) for b in range(B) for q in range(T) for k in range(q - w + 1, q + 1)
                   if k >= 0)

    gap = 0
    for a, (_, r) in enumerate(m.order):
        mask = mod.get(a) if r is None else steps[r]
        mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
        gap += pairs(mask, T) - pairs(mask, W)
    assert any(s is not None and not bool(s.all()) for s in steps) and mod  # really routed
    windowed = flops.forward_flops(m, out.records, B, T)
    for layer in m.layers:
        layer.mixer.window = None
    d_attn = m.cfg.n_heads * m.cfg.head_dim
    assert flops.forward_flops(m, out.records, B, T) - windowed == pytest.approx(4 * d_attn * gap)
