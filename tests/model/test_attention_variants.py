"""Checks every conditional attention variant (issue #19) must pass: strict causality, cached step-by-step
decoding == the full forward through HaipaiModel (MoR expert-choice routing, so routed steps gather tokens
with gaps), and training inside a MoR model (forward + backward, the loss falls on a fixed batch)."""

import functools

import pytest
import torch
from helpers import tiny_config, train_fixed_batch

from haipai_lightning.decode.engine import Engine
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers import (AdaptiveSpanAttention, CoPEAttention, CoreContextAttention,
                                           DTRNetAttention, MixtureOfHeadsAttention)
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

V, T = 61, 20
VARIANTS = {
    "moh": functools.partial(MixtureOfHeadsAttention, n_shared=1, top_k=2),
    "span": functools.partial(AdaptiveSpanAttention, max_span=8, ramp=3, init_span=0.5),  # shorter than T
    "dtr": functools.partial(DTRNetAttention, capacity=0.5),
    "cope": functools.partial(CoPEAttention, npos_max=16),
    "cope_norope": functools.partial(CoPEAttention, npos_max=32, rope=False),
    "cca": functools.partial(CoreContextAttention, group=3),  # several cores within T
}


def model(variant: str, seed: int = 0, **cfg) -> HaipaiModel:
    torch.manual_seed(seed)
    m = HaipaiModel(tiny_config(vocab_size=V, **cfg), mixer=VARIANTS[variant], router=ExpertChoiceRouter)
    with torch.no_grad():  # spread the depth, MoD and mixer gates: threshold routing really skips tokens at inference
        for p in [*m.router.parameters(), *m.mod_gates.parameters(),
                  *(p for n, p in m.named_parameters() if ".gate." in n)]:
            p.mul_(40)
    return m


@pytest.mark.parametrize("variant", VARIANTS)
def test_strictly_causal(variant):
    """Perturbing later tokens leaves every earlier output unchanged (eval mode)."""
    m = model(variant).eval()
    x = torch.randint(0, V, (2, T))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, T - 12))
    with torch.no_grad():
        a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


@pytest.mark.parametrize("mod", [0.0, 0.5])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant, mod):
    """generate-like use: one token at a time, and chunks, == the uncached forward (1e-5); with and without
    Mixture-of-Depths gates on the unshared layers."""
    m = model(variant, mod_capacity=mod, mod_every=1).eval()
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache()
        steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(T)], 1)
        cache = m.new_cache()
        chunks = torch.cat([m(x[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 15), (15, T))], 1)
    for got in (steps, chunks):
        torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)
    depth = [r for r in full.records if r.is_depth and r.step == 2]
    assert depth and not bool(depth[0].selected.all())  # routed steps really gathered a subset
    mods = [r.selected for r in full.records if r.group == "mod"]
    assert len(mods) == (2 if mod else 0) and all(bool(s.any()) and not bool(s.all()) for s in mods)
    if variant == "dtr":  # the mixer's own routing skipped tokens too (seen through the mixer directly)
        mixer = m.layers[1].mixer
        mixer.eval()
        routed = mixer.gate.threshold_logit(torch.randn(2, T, 32)) > 0
        assert bool(routed.any()) and not bool(routed.all())


@pytest.mark.parametrize("variant", VARIANTS)
def test_trains_inside_mor(variant):
    """Forward + backward inside a MoR model with expert-choice routing; the loss falls on a fixed batch."""
    torch.manual_seed(1)
    m = HaipaiModel(tiny_config(vocab_size=V), mixer=VARIANTS[variant], router=ExpertChoiceRouter).train()
    x = torch.randint(0, V, (4, 17))
    losses = train_fixed_batch(m, x, steps=25)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for n, p in m.named_parameters() if "mixer" in n and "layers.1." in n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_equals_generate(variant):
    """The depth-wise batching engine (cache rows per request slot) decodes what `generate` does, greedy."""
    m = model(variant, init_std=0.3).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 6, 2, 5)]
    outs = Engine(m, max_batch=2).generate(prompts, max_new_tokens=5)
    alone = [generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=5, temperature=0))[0, len(p):].tolist()
             for p in prompts]
    assert outs == alone


ROUTED = {"moh": "moh/layer1/1/balance", "span": "span/layer1/1/span", "dtr": "dtr/layer1/1/bce"}


@pytest.mark.parametrize("variant", ROUTED)
def test_routed_mixer_records_reach_the_loss(variant):
    """Block hands the pass's records to routed mixers: their aux losses reach ModelOutput.aux_losses once per
    application (the shared layer 1 runs at 3 recursion steps) and train on a fixed batch."""
    m = model(variant).train()
    x = torch.randint(0, V, (2, 17))
    out = m(x[:, :-1])
    names = [r.name for r in out.records if r.group == variant]
    assert names[:4] == [f"{variant}/layer0/0", f"{variant}/layer1/0", f"{variant}/layer1/1", f"{variant}/layer1/2"]
    assert ROUTED[variant] in out.aux_losses
    losses = train_fixed_batch(m, x, steps=15)
    assert losses[-1] < losses[0]


def test_block_hands_records_to_routed_mixers():
    m = model("dtr").train()
    out = m(torch.randint(0, V, (2, 16)))
    assert any(r.group == "dtr" for r in out.records)


@pytest.mark.parametrize("variant", ["moh", "span", "dtr", "cope", "cca"])
def test_front_door_and_export_round_trip(variant, tmp_path):
    """The allowlist names each variant `haipai_lightning.<Class>`; an export reloads to the same logits."""
    import haipai_lightning
    from haipai_lightning.io.export import load_pretrained, save_pretrained
    from haipai_lightning.io.spec import component_spec

    cls = VARIANTS[variant].func
    assert getattr(haipai_lightning, cls.__name__) is cls
    assert component_spec(VARIANTS[variant])["class_path"] == f"haipai_lightning.{cls.__name__}"
    m = model(variant).eval()
    path = save_pretrained(m, tmp_path / "export")
    m2 = load_pretrained(path)[0].eval()
    assert type(m2.layers[1].mixer) is cls
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m2(x).logits, m(x).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["span", "cope", "cope_norope"])
def test_explicit_score_variants_under_recursive_kv_sharing(variant):
    """kv_mode=shared (MoR section 2.3: later recursion steps reuse step 1's keys/values): causal, and
    cached decoding == the full forward."""
    m = model(variant, kv_mode="shared").eval()
    x = torch.randint(0, V, (2, T))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, T - 12))
    with torch.no_grad():
        full, other = m(x).logits, m(y).logits
        cache = m.new_cache()
        steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(T)], 1)
    torch.testing.assert_close(full[:, :12], other[:, :12], atol=1e-6, rtol=0)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_full_span_under_kv_sharing_is_standard_attention_under_kv_sharing():
    """The explicit-score path's KV sharing equals Attention's own: an adaptive span longer than the
    sequence is full attention, so the two models (same weights) agree under kv_mode=shared."""
    from haipai_lightning.model.mixers.attention import Attention

    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=V, kv_mode="shared")
    span = HaipaiModel(cfg, mixer=functools.partial(AdaptiveSpanAttention, max_span=4 * T, ramp=2),
                       router=ExpertChoiceRouter).eval()
    ref = HaipaiModel(cfg, mixer=Attention, router=ExpertChoiceRouter).eval()
    missing, unexpected = ref.load_state_dict(span.state_dict(), strict=False)
    assert not missing and all("span_frac" in k for k in unexpected)
    with torch.no_grad():
        for p in ref.router.parameters():
            p.mul_(40)
        span.router.load_state_dict(ref.router.state_dict())
        x = torch.randint(0, V, (2, T))
        torch.testing.assert_close(span(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
