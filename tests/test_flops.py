"""FLOP counting from routing records, and the FlopBudget callback."""

import functools

import pytest
import torch

from haipai_lightning.config import ModelConfig
from haipai_lightning.flops import forward_flops, training_flops
from haipai_lightning.model import HaipaiModel
from haipai_lightning.routers import ExpertChoiceRouter, TokenChoiceRouter

B, T, V, D = 2, 12, 50, 32


def cfg(**kw):
    base = dict(vocab_size=V, d_model=D, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                n_recursions=3, sharing="middle_cycle")
    base.update(kw)
    return ModelConfig(**base)


def layer_macs(m):
    return sum(p.numel() for n, p in m.layers[0].named_parameters() if p.ndim == 2)


def test_full_recursion_flops_by_hand():
    m = HaipaiModel(cfg())
    out = m(torch.randint(0, V, (B, T)))
    pairs = B * T * (T + 1) / 2
    expect = 2 * B * T * D * V + 5 * (2 * B * T * layer_macs(m) + 4 * pairs * D)
    assert forward_flops(m, out.records, B, T) == pytest.approx(expect)
    assert training_flops(m, out.records, B, T) == pytest.approx(3 * expect)


def test_expert_choice_counts_the_routed_tokens():
    m = HaipaiModel(cfg(), router=ExpertChoiceRouter)
    out = m(torch.randint(0, V, (B, T)))
    ks = [12, 8, 4]  # capacities 1, 2/3, 1/3 of 12
    pairs = lambda k: B * k * (k + 1) / 2  # noqa: E731
    expect = 2 * B * T * D * V + 2 * (2 * B * T * layer_macs(m) + 4 * pairs(T) * D)
    expect += sum(2 * B * k * layer_macs(m) + 4 * pairs(k) * D for k in ks)
    assert forward_flops(m, out.records, B, T) == pytest.approx(expect)


def test_shared_kv_skips_key_value_projections_after_step_one():
    m_rw = HaipaiModel(cfg(), router=ExpertChoiceRouter)
    m_sh = HaipaiModel(cfg(kv_mode="shared"), router=ExpertChoiceRouter)
    m_sh.load_state_dict(m_rw.state_dict())
    x = torch.randint(0, V, (B, T))
    f_rw, f_sh = (forward_flops(m, m(x).records, B, T) for m in (m_rw, m_sh))
    kv_macs = m_rw.layers[1].mixer.wk.weight.numel() + m_rw.layers[1].mixer.wv.weight.numel()
    # same routing (same weights); shared KV drops wk/wv on steps 2, 3 but its queries see more keys
    sel = [r.selected for r in m_sh(x).records]
    pos1 = torch.arange(1, T + 1)
    extra_pairs = sum(float((pos1 * s).sum()) - float((s.sum(1) * (s.sum(1) + 1) / 2).sum()) for s in sel[1:])
    saved = sum(2 * float(s.sum()) * kv_macs for s in sel[1:])
    assert f_sh == pytest.approx(f_rw - saved + 4 * extra_pairs * D)


def test_token_choice_uses_depths():
    m = HaipaiModel(cfg(), router=functools.partial(TokenChoiceRouter))
    out = m(torch.randint(0, V, (B, T)))
    depth = out.records[0].selected
    tokens = [int((depth > r).sum()) for r in range(3)]
    full = HaipaiModel(cfg())
    f_full = forward_flops(full, full(torch.randint(0, V, (B, T))).records, B, T)
    f = forward_flops(m, out.records, B, T)
    assert f < f_full or tokens == [B * T] * 3
