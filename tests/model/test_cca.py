"""Core-context-aware attention (arXiv 2412.12465, adapted): reductions to full attention, mean pooling,
far tokens reaching a query only through their group's core."""

from functools import partial

import pytest
import torch
from helpers import attention_twin, mixer_inputs, tiny_config

from haipai_lightning.config import ConfigError
from haipai_lightning.model.mixers import CoreContextAttention

B, T = 2, 12


inputs = partial(mixer_inputs, batch=B, length=T)  # (x (B, T, D), cos, sin)


@pytest.mark.parametrize("group", [1, T, 2 * T])
def test_reductions_to_full_attention(group):
    """group >= T: one group, the local window is everything; group 1: each earlier token is its own core."""
    cfg = tiny_config()
    m = CoreContextAttention(cfg, group=group)
    with torch.no_grad():
        m.pool_query.normal_()
    ref = attention_twin(m, cfg)
    x, cos, sin = inputs(cfg)
    torch.testing.assert_close(m(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)


def test_zero_pool_query_is_mean_pooling():
    cfg = tiny_config()
    m = CoreContextAttention(cfg, group=4)
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    ck, cv, present = m.cores(k, v, torch.arange(10)[None])
    torch.testing.assert_close(ck[:, :, 1], k[:, :, 4:8].mean(2))
    torch.testing.assert_close(cv[:, :, 2], v[:, :, 8:10].mean(2))
    assert present.tolist() == [[True, True, True]]


def test_far_tokens_reach_a_query_through_their_core_only():
    """Query at position 11 (group 2 of size 4): its local window starts at position 4, so token 1 reaches it
    only through group 0's pooled core -- and it does reach it."""
    cfg = tiny_config()
    m = CoreContextAttention(cfg, group=4)
    x, cos, sin = inputs(cfg)
    y = x.clone()
    y[:, 1] += 1.0
    a, b = m(x, cos, sin), m(y, cos, sin)
    assert (a[:, 11] - b[:, 11]).abs().max() > 1e-5  # through group 0's core
    torch.testing.assert_close(a[:, :1], b[:, :1])


def test_bad_arguments():
    with pytest.raises(ConfigError, match="group"):
        CoreContextAttention(tiny_config(), group=0)
