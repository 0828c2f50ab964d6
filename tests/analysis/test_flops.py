"""FLOP counting from routing records, and the FlopBudget callback."""

import functools

import pytest
from functools import partial

import torch

from haipai_lightning.config import ModelConfig
from haipai_lightning.analysis.flops import forward_flops, training_flops
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter
from helpers import tiny_config

B, T, V, D = 2, 12, 50, 32


cfg = partial(tiny_config, vocab_size=V, d_model=D, max_seq_len=32)  # the shared tiny model (helpers.TINY) with this file's sizes


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


# ------------------------------------------------------- against torch's FlopCounterMode
def _counted_training_flops(m, ids):
    """torch.utils.flop_counter.FlopCounterMode over forward + backward of the LM loss.

    FlopCounterMode has no formula for the CPU attention kernel (it counts its matmuls only on
    GPU kernels), so the CPU kernel is registered here with torch's own SDPA formulas, scaled
    by (T+1)/(2T) when causal: the kernel forms only the causal (query, key) pairs.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def causal(q_shape, k_shape, is_causal):
        Tq, Tk = q_shape[-2], k_shape[-2]
        return (Tk + 1) / (2 * Tk) if is_causal and Tq == Tk else 1.0

    def fwd(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kw):
        return int(sdpa_flop_count(q, k, v) * causal(q, k, is_causal))

    def bwd(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kw):
        return int(sdpa_backward_flop_count(grad_out, q, k, v) * causal(q, k, is_causal))

    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    })
    with counter:
        out = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()
    return counter.get_total_flops(), out.records


def test_dense_config_agrees_with_flop_counter_mode():
    T = 32
    m = HaipaiModel(cfg(d_model=64, ffn_hidden=128, n_recursions=1, max_seq_len=64))
    ids = torch.randint(0, V, (B, T + 1))
    counted, records = _counted_training_flops(m, ids)
    ours = training_flops(m, records, B, T)
    assert ours == pytest.approx(counted, rel=0.05)
    assert ours == pytest.approx(counted, rel=0.01)  # in fact: norms, softmax, activations are not matmuls


def test_routed_config_agrees_with_flop_counter_mode_by_capacities():
    T = 30
    m = HaipaiModel(cfg(d_model=64, ffn_hidden=128, max_seq_len=64), router=ExpertChoiceRouter)
    ids = torch.randint(0, V, (B, T + 1))
    counted, records = _counted_training_flops(m, ids)
    ours = training_flops(m, records, B, T)
    assert ours == pytest.approx(counted, rel=0.05)  # the routers' d -> 1 projections are not counted
    # the routed steps ran capacity x T tokens: 1, 2/3, 1/3 of 30
    assert [int(r.selected.sum()) for r in records] == [B * 30, B * 20, B * 10]
    full = HaipaiModel(cfg(d_model=64, ffn_hidden=128, max_seq_len=64))
    counted_full, rec_full = _counted_training_flops(full, ids)
    assert counted < counted_full and ours < training_flops(full, rec_full, B, T)


# ------------------------------------------------------------------- the budget callback
class _Blocks(torch.utils.data.Dataset):
    def __init__(self, n, T):
        self.x = torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i, :-1], "labels": self.x[i, 1:]}


@pytest.mark.parametrize("steps_worth", [3.5, 4.0])
def test_flop_budget_stops_within_one_step(tmp_path, steps_worth):
    import lightning as L

    from callbacks import FlopBudget
    from haipai_lightning.train.module import MoRLightningModule

    module = MoRLightningModule(config=cfg())  # full recursion: every step costs the same
    per_step = training_flops(module.model, module.model(torch.zeros(B, T, dtype=torch.long)).records, B, T)
    budget = FlopBudget(max_flops=steps_worth * per_step)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=100, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[budget])
    trainer.fit(module, torch.utils.data.DataLoader(_Blocks(64, T), batch_size=B))
    assert trainer.global_step == 4  # the first step at which the budget is reached
    assert budget.max_flops <= budget.flops < budget.max_flops + per_step
    assert trainer.callback_metrics["train/flops"].item() == pytest.approx(budget.flops)
    assert budget.tokens == 4 * B * T


def test_flops_per_token_uses_the_configured_capacities():
    from haipai_lightning.analysis.flops import flops_per_token

    m = HaipaiModel(cfg(), router=ExpertChoiceRouter)
    # recursion-wise attention pairs depend only on how many tokens a step keeps: nominal == measured
    assert flops_per_token(m, T) == pytest.approx(training_flops(m, m(torch.randint(0, V, (B, T))).records, B, T)
                                                  / (B * T))
    full = HaipaiModel(cfg())
    assert flops_per_token(full, T) == pytest.approx(training_flops(full, [], B, T) / (B * T))
    tc = HaipaiModel(cfg(), router=TokenChoiceRouter)
    assert flops_per_token(m, T) < flops_per_token(full, T) and flops_per_token(tc, T) < flops_per_token(full, T)
