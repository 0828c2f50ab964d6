"""Adaptive Computation Modules (arXiv 2312.10193): the gated sum of k learners, the dense split, distillation
(error non-increasing in k), gate pre-training labels, conditional compute, decoding and the phases."""

import functools
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config

from haipai_lightning.config import ConfigError
from haipai_lightning.io.spec import build_component
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mlps import AdaptiveComputationModule, SwiGLU
from haipai_lightning.train.acm import acmize, set_acm_phase, train_acm_phases

V, N = 61, 4
cfg = partial(tiny_config, vocab_size=V)  # ffn_hidden 64: four learners of 16 hidden units


def learners_reference(acm, x, k):
    """sum_{j < k[m]} learner_j(x[m]), one row and one learner at a time."""
    ex = acm.experts
    out = torch.zeros_like(x)
    for m in range(x.size(0)):
        for j in range(int(k[m])):
            out[m] = out[m] + (F.silu(x[m] @ ex.w1[j]) * (x[m] @ ex.w3[j])) @ ex.w2[j]
    return out


def test_gated_forward_with_k_blocks_is_the_sum_of_the_first_k_learners():
    torch.manual_seed(0)
    acm = AdaptiveComputationModule(cfg(), n_learners=N).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    for k in range(1, N + 1):  # every token the same k
        acm.forced_k = k
        rec = []
        out = acm(x, rec)
        ref = learners_reference(acm, x.view(-1, 32), torch.full((18,), k)).view_as(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        assert rec[0].metrics["expert_rows"] == 18 * k and rec[0].name == "acm/layer0/0"
    # a different k per token (the gate's choice): only the rows with k > j run learner j
    acm.forced_k = None
    k = torch.randint(1, N + 1, (18,))
    out, rows = acm.run_k(x.view(-1, 32), k)
    torch.testing.assert_close(out, learners_reference(acm, x.view(-1, 32), k), rtol=0, atol=1e-12)
    assert rows == int(k.sum())
    rec = []
    acm(x, rec)  # eval: argmax of the gate; rows = sum of the chosen k, not N per token
    kk = rec[0].selected.flatten() + 1
    assert rec[0].metrics["expert_rows"] == kk.sum() and kk.sum() < N * 18 or bool((kk == N).all())
    torch.testing.assert_close(rec[0].metrics["mean_active_blocks"], kk.float().mean())


def test_the_dense_split_sums_to_the_dense_mlp_and_distillation_keeps_error_non_increasing_in_k():
    torch.manual_seed(0)
    c = cfg()
    dense = SwiGLU(c)
    for p in dense.parameters():  # a spread of unit scales, as a trained MLP has
        p.data.normal_(0, 0.3)
    x = torch.randn(4, 16, 32)
    acm = AdaptiveComputationModule(c, n_learners=N, phase="distill")
    acm.load_dense(dense, calibration=x.view(-1, 32))
    f = dense(x.view(-1, 32)).detach()

    def errors():
        with torch.no_grad():
            S = acm.prefix_sums(x.view(-1, 32))
            return ((S - f).pow(2).sum(-1) / f.pow(2).sum(-1)).mean(-1)  # (N,) relative error after k learners

    e0 = errors()
    assert e0[-1] < 1e-10  # the N groups of hidden units ARE the dense MLP
    assert all(e0[i] >= e0[i + 1] for i in range(N - 1))
    acm.train()
    opt = torch.optim.Adam(acm.experts.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        rec = []
        out = acm(x, rec)
        torch.testing.assert_close(out.view(-1, 32), f)  # distill phase: the layer still outputs its teacher
        loss = rec[0].aux_losses["distill"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    e = errors()
    assert losses[-1] < losses[0]  # the mean over k of the relative error went down
    assert all(e[i] >= e[i + 1] for i in range(N - 1)), e  # more learners never worse
    assert e[0] < e0[0]  # the first learner alone got better


def test_gate_pretraining_labels_are_the_smallest_k_within_tolerance():
    torch.manual_seed(0)
    c = cfg()
    dense = SwiGLU(c)
    acm = AdaptiveComputationModule(c, n_learners=N, gate_tolerance=0.3, phase="gate")
    acm.load_dense(dense)
    x = torch.randn(2, 8, 32)
    acm.train()
    rec = []
    acm(x, rec)
    flat = x.view(-1, 32)
    f = dense(flat)
    rel = ((acm.prefix_sums(flat) - f).pow(2).sum(-1) / f.pow(2).sum(-1)).detach()  # (N, M)
    label = torch.tensor([next(k for k in range(N) if k == N - 1 or rel[k, m] <= 0.3) for m in range(16)])
    logits = acm.gate(flat)
    torch.testing.assert_close(rec[0].aux_losses["gate_ce"], F.cross_entropy(logits, label))


def test_acm_decodes_with_a_cache_like_the_full_forward():
    torch.manual_seed(0)
    model = HaipaiModel(cfg(), mlp=partial(AdaptiveComputationModule, n_learners=N, gate_hidden=8)).eval()
    for layer in model.layers:  # a gate that spreads its choices over k
        torch.nn.init.normal_(layer.mlp.gate[2].weight, std=2.0)
    ids = torch.randint(0, V, (2, 12))
    full = model(ids)
    ks = torch.cat([r.selected.flatten() for r in full.records if r.group == "acm"])
    assert len(ks.unique()) > 1  # tokens really choose different k
    cache = model.new_cache()
    step = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(step, 1), full.logits, atol=1e-5, rtol=1e-5)


def test_phases_freeze_what_they_should_and_end_to_end_learns():
    torch.manual_seed(0)
    dense = HaipaiModel(cfg())
    ids = torch.randint(0, V, (4, 17))
    model = acmize(dense, calibration_ids=ids[:, :-1], n_learners=N, budget=0.5)
    for a, b in zip(model.layers, dense.layers):  # everything but the MLPs copied
        torch.testing.assert_close(a.mixer.wq.weight, b.mixer.wq.weight)
    with torch.no_grad():  # distill phase: each layer outputs its teacher, so the model IS the dense model
        torch.testing.assert_close(model.eval()(ids).logits, dense.eval()(ids).logits)
    set_acm_phase(model, "gate")
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {"gate"}
    batches = iter(lambda: {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, None)
    log = train_acm_phases(model, batches, distill_steps=3, gate_steps=3, end_to_end_steps=12)
    e2e = [loss for phase, loss in log if phase == "end_to_end"]
    assert [phase for phase, _ in log][::3] == ["distill", "gate"] + ["end_to_end"] * 4
    assert e2e[-1] < e2e[0] and all(p.requires_grad for p in model.parameters())
    rec = model.eval()(ids).records
    assert all(0 < float(r.metrics["active_fraction"]) <= 1 for r in rec if r.group == "acm")


def test_bad_acm_arguments_and_the_yaml_spec():
    with pytest.raises(ConfigError, match="n_learners=5"):
        AdaptiveComputationModule(cfg(), n_learners=5)
    with pytest.raises(ConfigError, match="budget"):
        AdaptiveComputationModule(cfg(), budget=1.5)
    with pytest.raises(ConfigError, match="load_dense"):  # the distill phase without a teacher
        AdaptiveComputationModule(cfg(), phase="distill")(torch.randn(1, 3, 32))
    f = build_component({"class_path": "haipai_lightning.AdaptiveComputationModule", "init_args": {"n_learners": 2}})
    assert isinstance(f(cfg()), AdaptiveComputationModule) and f(cfg()).n_learners == 2


def test_the_acm_phases_callback_follows_the_global_step():
    from types import SimpleNamespace

    from callbacks import ACMPhases

    torch.manual_seed(0)
    dense = HaipaiModel(cfg())
    model = acmize(dense, n_learners=N)
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    cb = ACMPhases(distill_steps=2, gate_steps=1)
    cb.on_fit_start(SimpleNamespace(global_step=0), module)  # no dense_ckpt: the ACMs keep their teachers
    seen = []
    for step in range(5):  # a resumed run at step 3 would land in the same phase
        cb.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        seen.append(model.layers[0].mlp.phase)
    assert seen == ["distill", "distill", "gate", "end_to_end", "end_to_end"]
    with pytest.raises(ConfigError, match="AdaptiveComputationModule"):
        cb.on_fit_start(SimpleNamespace(global_step=0), SimpleNamespace(model=dense))
    with pytest.raises(ConfigError, match="distill_steps"):
        ACMPhases(distill_steps=-1)
