"""Hybrid attention / Mamba stacks, attention options (sliding window, MQA, flex) and the FLOP
count of the new components."""

import functools
import math

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from helpers import train_fixed_batch, tiny_config

from haipai_lightning import flops
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.rope import apply_rope
from haipai_lightning.model.mixers import Attention, Mamba
from haipai_lightning.model.mixers import attention as attention_module
from haipai_lightning.model.mlps import MixtureOfTokens, TokenChoiceMoE
from haipai_lightning.decode.engine import Engine
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.speculative import speculative_generate
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V, T = 61, 20


cfg = partial(tiny_config, vocab_size=V, n_layers=8)  # the shared tiny model (helpers.TINY) with this file's sizes


# ----------------------------------------------------------------- patterns
def test_pattern_maps_onto_unique_layers():
    m = HaipaiModel(cfg(mixer_pattern="AM"))  # unique layers: 0 prelude, 1-2 shared (x3), 3 coda
    kinds = ["M" if isinstance(layer.mixer, Mamba) else "A" for layer in m.layers]
    assert kinds == ["A", "M", "A", "M"]
    assert "".join(kinds[i] for i, _ in m.order) == "AMAMAMAM"  # effective: the shared block repeats
    assert all(isinstance(layer.mixer, Attention) for layer in HaipaiModel(cfg()).layers)


@pytest.mark.parametrize("pattern", ["AXM", "", "am"])
def test_bad_pattern_names_the_field(pattern):
    with pytest.raises(ConfigError, match="model.config.mixer_pattern=.*A \\(attention\\), M \\(Mamba\\)"):
        cfg(mixer_pattern=pattern)


@pytest.mark.parametrize("mlp", [None, functools.partial(TokenChoiceMoE, n_experts=4),
                                 functools.partial(MixtureOfTokens, n_experts=4)], ids=["dense", "moe", "mot"])
def test_hybrid_model_decodes_with_the_cache(mlp):
    """Unrouted hybrid MoR model: prefill + one token at a time == the full forward (MoE/MoT route per token)."""
    m = HaipaiModel(cfg(mixer_pattern="MA"), mlp=mlp).eval()
    x = torch.randint(0, V, (2, T))
    full = m(x).logits
    cache = m.new_cache()
    pieces = [m(x[:, :6], cache=cache).logits]
    pieces += [m(x[:, t : t + 1], cache=cache).logits for t in range(6, 12)]
    pieces.append(m(x[:, 12:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router,kv,mod", [("ec", "recursion_wise", 0.5), ("tc", "shared", 0.0)])
def test_routed_hybrid_decodes_with_the_cache(router, kv, mod):
    """MoR routing + Mamba in the shared block: the Mamba state only advances on the tokens routed to
    its step (the cache view's pads are identity steps), so cached decoding == the full forward."""
    torch.manual_seed(0)
    routers = {"ec": ExpertChoiceRouter, "tc": TokenChoiceRouter}
    m = HaipaiModel(cfg(mixer_pattern="MAM", kv_mode=kv, mod_capacity=mod), router=routers[router]).eval()
    with torch.no_grad():  # spread the gates so threshold routing really varies the depth
        for prm in list(m.router.parameters()) + list(m.mod_gates.parameters()):
            prm.mul_(40)
        x = torch.randint(0, V, (3, T))
        out = m(x)
        cache = m.new_cache()
        pieces = [m(x[:, :7], cache=cache).logits] + [m(x[:, t : t + 1], cache=cache).logits for t in range(7, 14)]
        pieces.append(m(x[:, 14:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), out.logits, atol=1e-5, rtol=1e-5)
    depths = [r.selected for r in out.records if r.name.startswith("depth/")]
    assert any(d.dtype != torch.bool and len(d.unique()) > 1 or (d.any() and not d.all()) for d in depths)


@pytest.mark.parametrize("router,kv", [("ec", "recursion_wise"), ("tc", "shared")])
def test_engine_batches_hybrid_models(router, kv):
    """Continuous depth-wise batching with Mamba in the shared block: each (recursion step, slot) keeps
    its own recurrent state row, so the engine's outputs equal each request decoded alone."""
    torch.manual_seed(0)
    routers = {"ec": ExpertChoiceRouter, "tc": TokenChoiceRouter}
    m = HaipaiModel(cfg(mixer_pattern="MAM", kv_mode=kv, init_std=0.2), router=routers[router]).eval()
    with torch.no_grad():
        for prm in m.router.parameters():
            prm.mul_(40)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (4, 2, 6, 4)]
    engine = Engine(m, max_batch=2)  # slots are reused: their state rows are reset
    outs = engine.generate(prompts, max_new_tokens=6)
    alone = [generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=6, temperature=0))[0, len(p):].tolist()
             for p in prompts]
    assert outs == alone
    assert engine.stats["block_tokens"] > engine.stats["block_passes"]


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(-1, -1)):
    """flash_attn_varlen_func's contract in PyTorch: packed (N, H, hd) sequences cut at cu_seqlens,
    causal, GQA by head groups, window (left, right)."""
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, n, hd)
        n = e - s
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        mask = (j <= i) & ((j > i - window_size[0] - 1) if window_size[0] >= 0 else True)
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        out.append(y.transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 3])
def test_flash_varlen_packing_equals_padded_causal_attention(window):
    """Token-choice rows of unequal length (pads trail): packing the real tokens for a varlen kernel
    and scattering back gives padded causal attention's outputs on every real token, zeros on pads."""
    torch.manual_seed(0)
    B, T, H, Hkv, hd = 3, 7, 4, 2, 8
    q, k, v = torch.randn(B, T, H, hd), torch.randn(B, T, Hkv, hd), torch.randn(B, T, Hkv, hd)
    valid = torch.arange(T)[None] < torch.tensor([7, 4, 1])[:, None]
    w = (-1, -1) if window is None else (window - 1, 0)
    y = attention_module.flash_varlen(q, k, v, valid, w, _varlen_reference)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    mask = (j <= i) & ((j > i - window) if window else True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(y[valid], ref[valid], atol=1e-6, rtol=1e-5)
    assert (y[~valid] == 0).all()


def test_hybrid_speculative_decoding_equals_greedy():
    """Speculative decoding rolls the caches back (KVCache.truncate): Mamba restores its state from
    its per-token history, so the output is plain greedy decoding."""
    torch.manual_seed(0)
    m = HaipaiModel(cfg(n_layers=5, mixer_pattern="MMA", init_std=0.2)).eval()  # a large init: drafts get rejected
    prompt = torch.randint(0, V, (1, 4))
    seq, stats = speculative_generate(m, prompt, 10, k=3)
    assert stats["acceptance"] < 1  # drafts were rejected, so the caches did roll back
    assert torch.equal(seq, generate(m, prompt, SamplingConfig(max_new_tokens=10, temperature=0)))


def test_routed_hybrid_is_causal_and_learns():
    torch.manual_seed(0)
    m = HaipaiModel(cfg(n_layers=5, mixer_pattern="AMA"), router=ExpertChoiceRouter)
    x = torch.randint(0, V, (4, T + 1))
    losses = train_fixed_batch(m, x, steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    m.eval()
    y = x.clone()
    y[:, 12] = (y[:, 12] + 5) % V
    torch.testing.assert_close(m(x).logits[:, :12], m(y).logits[:, :12], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------- attention options
def banded_reference(att, x, cos, sin, window):
    B, n, _ = x.shape
    q = apply_rope(att.wq(x).view(B, n, att.n_heads, att.head_dim), cos, sin).transpose(1, 2)
    k = apply_rope(att.wk(x).view(B, n, att.n_kv_heads, att.head_dim), cos, sin).transpose(1, 2)
    v = att.wv(x).view(B, n, att.n_kv_heads, att.head_dim).transpose(1, 2)
    rep = att.n_heads // att.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    w = (q @ k.transpose(-1, -2)) / math.sqrt(att.head_dim)
    w = w.masked_fill(~((j <= i) & (j > i - window)), float("-inf")).softmax(-1)
    return att.wo((w @ v).transpose(1, 2).reshape(B, n, -1))


@pytest.mark.parametrize("kv_heads", [2, 1])  # grouped-query and multi-query
def test_sliding_window_equals_banded_attention_and_decodes(kv_heads):
    window = 5
    c = cfg(n_kv_heads=kv_heads, n_recursions=1, n_layers=2)
    m = HaipaiModel(c, mixer=functools.partial(Attention, window=window)).eval()
    att = m.layers[0].mixer
    x = torch.randn(2, T, 32)
    cos, sin = m.rope(torch.arange(T))
    torch.testing.assert_close(att(x, cos, sin), banded_reference(att, x, cos, sin, window), atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, V, (2, T))
    full = m(ids).logits
    cache = m.new_cache()
    pieces = [m(ids[:, :8], cache=cache).logits] + [m(ids[:, t : t + 1], cache=cache).logits for t in range(8, T)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="window=0"):
        Attention(c, window=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 6])
def test_flex_attention_inference_equals_sdpa(window, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attention_module, "_FLEX", flex_attention)  # eager: no 40 s compile in a unit test
    c = cfg(n_recursions=1, n_layers=2)
    sdpa = Attention(c, window=window)
    flex = Attention(c, window=window, flex=True)
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 32, 32)
    cos, sin = HaipaiModel(c).rope(torch.arange(32))
    with torch.no_grad():
        torch.testing.assert_close(flex(x, cos, sin), sdpa(x, cos, sin), atol=1e-5, rtol=1e-5)
    assert flex(x, cos, sin).requires_grad  # training never takes the flex path (no CPU backward)


# ---------------------------------------------------------------------- FLOPs
def test_flops_of_mamba_moe_and_window_layers():
    B = 2
    c = cfg(n_layers=4, n_recursions=1, mixer_pattern="AM")
    moe = functools.partial(TokenChoiceMoE, n_experts=4, top_k=2, expert_hidden=16)
    m = HaipaiModel(c, mixer=functools.partial(Attention, window=4), mlp=moe)
    out = m(torch.randint(0, V, (B, T)))
    D, n = 32, B * T
    att = m.layers[0]
    mam: Mamba = m.layers[1].mixer
    router = 32 * 4
    attn_linear = sum(p.numel() for name, p in att.mixer.named_parameters())
    expert = 3 * D * 16
    pairs = B * (4 * 5 / 2 + (T - 4) * 4)  # window 4: min(i, 4) keys for the i-th query
    per_attn = 2 * n * (attn_linear + router) + 4 * pairs * D + 2 * (2 * n) * expert  # top-2: 2n rows
    Di, N, R = mam.d_inner, mam.d_state, mam.dt_rank
    mamba_macs = D * 2 * Di + Di * (R + 2 * N) + Di * R + Di * D + Di * 4 + 3 * Di * N
    assert mam.macs_per_token() == mamba_macs
    per_mamba = 2 * n * (mamba_macs + router) + 2 * (2 * n) * expert
    expect = 2 * n * D * V + 2 * per_attn + 2 * per_mamba
    assert flops.forward_flops(m, out.records, B, T) == pytest.approx(expect)
    # the experts' rows come from the records: capacity drops shrink them
    assert set(flops.expert_rows(m, out.records)) == {0, 1, 2, 3}
    assert all(r == 2 * n for r in flops.expert_rows(m, out.records).values())
