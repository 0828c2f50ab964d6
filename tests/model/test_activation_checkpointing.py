"""Activation checkpointing of the recursion blocks: same loss, same gradients, records once."""

import functools

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from haipai_lightning.config import ModelConfig
from haipai_lightning.model.mlps import TokenChoiceMoE
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter
from helpers import tiny_config

V = 64


cfg = partial(tiny_config, vocab_size=V, max_seq_len=32)  # the shared tiny model (helpers.TINY) with this file's sizes


CASES = {
    "full_recursion": (cfg(), {}),
    "expert_choice": (cfg(), dict(router=ExpertChoiceRouter)),
    "expert_choice_shared_kv": (cfg(kv_mode="shared"), dict(router=ExpertChoiceRouter)),
    "token_choice": (cfg(), dict(router=TokenChoiceRouter)),
    "moe_bias_balancing": (cfg(), dict(router=ExpertChoiceRouter, mlp=functools.partial(
        TokenChoiceMoE, n_experts=4, top_k=2, expert_hidden=32, bias_balancing=True))),
    "mamba_hybrid": (cfg(mixer_pattern="AM"), dict(router=ExpertChoiceRouter)),
}


def grads(model, ids, checkpointing):
    model.activation_checkpointing = checkpointing
    model.zero_grad()
    out = model(ids[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + sum(out.aux_losses.values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out.records


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_identical_with_and_without_checkpointing(case):
    config, parts = CASES[case]
    torch.manual_seed(0)
    model = HaipaiModel(config, **parts)
    ids = torch.randint(0, V, (2, 17))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss0, g0, rec0 = grads(model, ids, False)
    model.load_state_dict(state)  # undo buffer updates (loss-free bias, step counters) of the first pass
    loss1, g1, rec1 = grads(model, ids, True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    # the recomputation in the backward appended no routing records
    assert [r.name for r in rec1] == [r.name for r in rec0]


def test_checkpointing_is_off_outside_training_graphs():
    model = HaipaiModel(cfg(), router=ExpertChoiceRouter)
    model.activation_checkpointing = True
    with torch.no_grad():
        out = model(torch.randint(0, V, (1, 8)))
    assert out.logits.shape == (1, 8, V)


def test_module_flag_sets_the_model():
    from haipai_lightning.train.module import MoRLightningModule

    assert MoRLightningModule(config=cfg(), activation_checkpointing=True).model.activation_checkpointing


def saved_bytes(model, ids):
    """Bytes of the tensors autograd keeps for the backward during one forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return total[0]


def test_checkpointing_keeps_fewer_activations():
    model = HaipaiModel(cfg(n_layers=8, n_recursions=3), router=ExpertChoiceRouter)
    ids = torch.randint(0, V, (2, 24))
    full = saved_bytes(model, ids)
    model.activation_checkpointing = True
    ckpt = saved_bytes(model, ids)
    assert ckpt < 0.6 * full, (ckpt, full)  # 6 of 8 layer applications keep only their inputs
