"""LESA growth (arXiv 2502.13794): layer prediction quality and checkpoint replay of the op."""

import os

import pytest
import torch
import torch.nn.functional as F

from haipai_lightning.config import ModelConfig
from haipai_lightning.grow.arch import replay_arch
from haipai_lightning.grow.lesa import LESA, block_tensors, relative_error
from haipai_lightning.grow.ops import grow, gstack, lesa
from haipai_lightning.io.arch import arch_of, build_model
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from helpers import train_on_kjv


@pytest.fixture(scope="module")
def trained_deep():
    """A vanilla 8-layer model (d=64) trained briefly on King James Bible text."""
    return train_on_kjv(lambda: HaipaiModel(ModelConfig(vocab_size=1024, d_model=64, n_layers=8, n_heads=4,
                                                        n_kv_heads=2, ffn_hidden=128, max_seq_len=64)), steps=40)[0]


def test_lesa_leave_one_layer_out_beats_copy_and_average(trained_deep):
    sd = trained_deep.state_dict()
    layers = [block_tensors(sd, i) for i in range(8)]
    wins = {"copy": 0, "average": 0}
    names = [k for k, v in layers[0].items() if v.dim() == 2]
    for j in (3, 4):
        pred = LESA(layers, skip={j}).predict(layers[j - 1], layers[j + 1])
        for name in names:
            true = layers[j][name]
            e = relative_error(pred[name], true)
            copy_e = min(relative_error(layers[j - 1][name], true), relative_error(layers[j + 1][name], true))
            avg_e = relative_error(0.5 * (layers[j - 1][name] + layers[j + 1][name]), true)
            wins["copy"] += e < copy_e
            wins["average"] += e < avg_e
    # summed over matrices too: the whole predicted layer
    assert wins["copy"] == 2 * len(names) and wins["average"] == 2 * len(names), wins


def test_lesa_op_grows_the_shared_block_and_replays_from_the_log():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=11, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                      n_recursions=3, sharing="middle_cycle")
    m = HaipaiModel(cfg, router=ExpertChoiceRouter).eval()
    g, rep = lesa(m, extra_layers=1, steps=50)
    ref, _ = gstack(m, extra_layers=1)
    assert g.cfg.n_layers == ref.cfg.n_layers and len(g.layers) == len(ref.layers) == len(m.layers) + 1
    assert rep.op == "lesa" and rep.max_abs_dlogits > 0  # not function preserving: measured, not bounded
    new = list(g.schedule.shared)[-1]
    old_last = list(m.schedule.shared)[-1]
    assert not torch.equal(g.layers[new].mixer.wq.weight, m.layers[old_last].mixer.wq.weight)  # predicted, not copied
    arch = replay_arch(arch_of(m), [{"op": "lesa", "args": rep.args}])
    rebuilt = build_model(arch)
    rebuilt.load_state_dict(g.state_dict())
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x).logits, g(x).logits)
    g2, _ = grow(m, "lesa", {"extra_layers": 1, "steps": 50})
    assert len(g2.layers) == len(g.layers)
