"""CoPE (arXiv 2405.18719): contextual positions from gates, their interpolation, and RoPE on or off."""

from functools import partial

import pytest
import torch
from helpers import attention_twin, mixer_inputs, tiny_config

from haipai_lightning.config import ConfigError
from haipai_lightning.model.mixers import CoPEAttention

B, T = 2, 8


inputs = partial(mixer_inputs, batch=B, length=T)  # (x (B, T, D), cos, sin)


CAUSAL = torch.ones(T, T, dtype=torch.bool).tril()[None, None]


def test_saturated_gates_count_relative_positions():
    """g = 1 everywhere: p_ij = i - j + 1 for every visible key j <= i."""
    m = CoPEAttention(tiny_config(), npos_max=16)
    p = m.contextual_positions(torch.full((B, 4, T, T), 50.0), CAUSAL)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    torch.testing.assert_close(p[0, 0][CAUSAL[0, 0]], (i - j + 1).float()[CAUSAL[0, 0]])
    assert bool((p[0, 0][~CAUSAL[0, 0]] == 0).all())


def test_positions_never_increase_with_j():
    m = CoPEAttention(tiny_config(), npos_max=16)
    torch.manual_seed(0)
    p = m.contextual_positions(torch.randn(B, 4, T, T) * 3, CAUSAL)
    assert bool((p[..., 1:] <= p[..., :-1] + 1e-6).all())
    assert bool((p >= 0).all()) and bool((p.diagonal(dim1=-2, dim2=-1) <= 1).all())  # p_ii = g_ii


def test_interpolation_between_integer_positions():
    m = CoPEAttention(tiny_config(), npos_max=8)
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, m.head_dim)
    e = q @ m.pos_emb  # (1, 1, 1, 8): q . e[p] at the integers
    got = m.position_logits(q, torch.tensor([2.0, 2.25, 7.0, 30.0]).view(1, 1, 1, 4))
    want = torch.stack([e[..., 2], 0.75 * e[..., 2] + 0.25 * e[..., 3], e[..., 7], e[..., 7]], -1)  # 30 clamps to 7
    torch.testing.assert_close(got, want)


def test_zero_position_embeddings_with_rope_is_attention():
    cfg = tiny_config()
    m = CoPEAttention(cfg, rope=True)
    with torch.no_grad():
        m.pos_emb.zero_()
    ref = attention_twin(m, cfg)
    x, cos, sin = inputs(cfg)
    torch.testing.assert_close(m(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)


def test_without_rope_positions_come_from_cope_only():
    """rope=False and e = 0: no position information at all (the last output ignores the order of the others);
    with CoPE's embeddings the order matters again."""
    cfg = tiny_config()
    m = CoPEAttention(cfg, rope=False)
    x, cos, sin = inputs(cfg)
    perm = torch.cat([torch.randperm(T - 1), torch.tensor([T - 1])])
    assert (m(x, cos, sin)[:, -1] - m(x[:, perm], cos, sin)[:, -1]).abs().max() > 1e-5
    with torch.no_grad():
        m.pos_emb.zero_()
    torch.testing.assert_close(m(x, cos, sin)[:, -1], m(x[:, perm], cos, sin)[:, -1], atol=1e-6, rtol=0)


def test_position_embeddings_learn():
    cfg = tiny_config()
    m = CoPEAttention(cfg)
    x, cos, sin = inputs(cfg)
    m(x, cos, sin).pow(2).sum().backward()
    assert m.pos_emb.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ConfigError, match="npos_max"):
        CoPEAttention(tiny_config(), npos_max=1)
