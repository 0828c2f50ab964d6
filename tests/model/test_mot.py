"""Mixture-of-Tokens: group mixing == explicit reference, causality, batch coupling vs discrete
decoding, temperature, learning inside a MoR model."""

import functools

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from helpers import train_fixed_batch, tiny_config

from haipai_lightning.config import ModelConfig
from haipai_lightning.model.mlps import MixtureOfTokens
from haipai_lightning.model.decoder import HaipaiModel

V, T = 61, 16


cfg = partial(tiny_config, vocab_size=V)  # the shared tiny model (helpers.TINY) with this file's sizes


def reference(mot, x):
    """Groups of G consecutive examples, position by position, expert by expert."""
    B, T_, D = x.shape
    G, ex = min(mot.group_size, B), mot.experts
    out = torch.zeros_like(x)
    for g0 in range(0, B, G):
        members = list(range(g0, min(g0 + G, B)))
        for t in range(T_):
            xs = x[members, t]  # (g, D)
            w = (mot.controller(xs) / mot.temperature).softmax(0)  # (g, E): over the group
            for e in range(mot.n_experts):
                m = (w[:, e : e + 1] * xs).sum(0)
                y = (F.silu(m @ ex.w1[e]) * (m @ ex.w3[e])) @ ex.w2[e]
                out[members, t] += w[:, e : e + 1] * y
    return out


@pytest.mark.parametrize("B,G", [(4, 2), (3, 2), (5, 8)])  # exact groups, a padded last group, G > B
def test_mixing_equals_reference(B, G):
    mot = MixtureOfTokens(cfg(), n_experts=3, group_size=G, temperature=0.7)
    x = torch.randn(B, T, 32)
    rec = []
    out = mot(x, rec)
    torch.testing.assert_close(out, reference(mot, x), atol=1e-5, rtol=1e-5)
    g = min(G, B)
    assert rec[0].metrics["expert_rows"].item() == 3 * -(-B // g) * T  # E mixtures per group and position
    assert rec[0].kind == "mot" and rec[0].selected.all()


def test_causal_but_coupled_across_the_group_and_discrete_is_independent():
    mot = MixtureOfTokens(cfg(), n_experts=4, group_size=4)
    x = torch.randn(4, T, 32)
    y = x.clone()
    y[2, 9] += 1.0  # change example 2 at position 9
    a, b = mot(x), mot(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # no example's earlier positions move: causal
    torch.testing.assert_close(a[:, 10:], b[:, 10:])  # nor later ones (positions never mix)
    assert not torch.allclose(a[0, 9], b[0, 9])  # but example 0 shares position 9's group
    mot.eval()  # discrete routing: every token on its own
    torch.testing.assert_close(mot(x)[0], mot(x[:1])[0])
    rec = []
    mot(x, rec)
    assert (rec[0].selected.sum(-1) == 1).all()  # decode_top_k = 1
    assert rec[0].metrics["expert_rows"].item() == 4 * T


def test_temperature_learns_and_low_temperature_is_nearly_discrete():
    mot = MixtureOfTokens(cfg(), n_experts=4, group_size=4)
    x = torch.randn(4, T, 32)
    mot(x).pow(2).sum().backward()
    assert mot.log_temperature.grad is not None and mot.log_temperature.grad != 0
    cold = MixtureOfTokens(cfg(), n_experts=4, group_size=4, temperature=1e-3, learn_temperature=False)
    with torch.no_grad():
        cold.controller.weight.mul_(50)
    rec = []
    cold(x, rec)
    assert rec[0].metrics["mean_max_weight"].item() > 0.99  # each expert takes ~one token per group
    assert not cold.log_temperature.requires_grad


@pytest.mark.parametrize("discrete", [False, True])
def test_loss_decreases_in_a_mor_model(discrete):
    torch.manual_seed(0)
    m = HaipaiModel(cfg(), mlp=functools.partial(MixtureOfTokens, n_experts=4, group_size=4, discrete=discrete))
    x = torch.randint(0, V, (4, T + 1))

    def controllers_get_gradients():
        assert all(layer.mlp.controller.weight.grad.abs().sum() > 0 for layer in m.layers)

    losses = train_fixed_batch(m, x, steps=20, aux=False, after_first_backward=controllers_get_gradients)
    assert losses[-1] < 0.7 * losses[0], losses
