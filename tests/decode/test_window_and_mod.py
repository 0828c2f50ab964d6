"""Sliding-window attention under MoR routing and Mixture-of-Depths: the window is over absolute positions
in the uncached forward, the cached prefill and token-by-token decoding alike; and the engine with
Mixture-of-Depths at every Nr (its Nr=1 block pass goes through the gates) equals `generate`."""

import functools

import pytest
import torch

from haipai_lightning.config import ModelConfig
from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V, T, W = 61, 24, 4  # a sequence several windows long
ROUTERS = {"full": FullRecursion, "ec": ExpertChoiceRouter, "tc": TokenChoiceRouter}
N_LAYERS = {1: 4, 2: 6, 3: 8}  # middle_cycle: Nr=1 makes every layer "shared" (a vanilla stack)


def model(router="full", kv="recursion_wise", nr=3, mod=0.0, window=W, std=0.02, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=N_LAYERS[nr], n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=64, n_recursions=nr, sharing="middle_cycle", kv_mode=kv, mod_capacity=mod,
                      mod_every=1, init_std=std, tie_embeddings=std == 0.02)
    mixer = functools.partial(Attention, window=window) if window else None
    m = HaipaiModel(cfg, mixer=mixer, router=ROUTERS[router]).eval()
    with torch.no_grad():  # spread the gates: threshold routing then really skips tokens
        for p in list(m.router.parameters()) + list(m.mod_gates.parameters()):
            p.mul_(40)
    return m


def routing_varied(records) -> bool:
    """Did some router (depth or MoD) take a strict subset of the tokens somewhere?"""
    for r in records:
        s = r.selected
        if s is None:
            continue
        if s.dtype == torch.bool and bool(s.any()) and not bool(s.all()):
            return True
        if s.dtype != torch.bool and len(s.unique()) > 1:
            return True
    return False


CASES = [(r, kv, nr, mod) for r in ROUTERS for kv in ("recursion_wise", "shared")
         for nr, mod in ((3, 0.0), (3, 0.5), (1, 0.5))]


@pytest.mark.parametrize("router,kv,nr,mod", CASES)
def test_windowed_forward_equals_cached_prefill_and_decoding(router, kv, nr, mod):
    """Eval mode (routers decide causally by threshold in every path): uncached == cached prefill ==
    one token at a time == chunks after a prefix."""
    m = model(router, kv, nr, mod)
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        out = m(x)
        prefill = m(x, cache=m.new_cache()).logits
        cache = m.new_cache()
        steps = torch.cat([m(x[:, t : t + 1], cache=cache).logits for t in range(T)], 1)
        cache = m.new_cache()
        chunks = torch.cat([m(x[:, a:b], cache=cache).logits for a, b in ((0, 9), (9, 10), (10, 17), (17, T))], 1)
    for got in (prefill, steps, chunks):
        torch.testing.assert_close(got, out.logits, atol=1e-5, rtol=1e-5)
    if router != "full" and nr > 1 or mod > 0:
        assert routing_varied(out.records)  # gathered tokens had gaps: the window semantics mattered


def test_window_matters_for_routed_rows():
    """The routed, windowed model is not the unwindowed one (the window really cuts keys off)."""
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        a, b = model("ec", mod=0.5)(x).logits, model("ec", mod=0.5, window=None)(x).logits
    assert (a - b).abs().max() > 1e-3


ENGINE_CASES = [("full", 1, None), ("full", 1, W), ("full", 2, None), ("full", 2, W), ("full", 3, None),
                ("ec", 3, W), ("tc", 2, W), ("ec", 1, None)]


@pytest.mark.parametrize("router,nr,window", ENGINE_CASES)
def test_engine_equals_generate_with_mixture_of_depths(router, nr, window):
    """Mixture-of-Depths at every Nr (Nr=1: every layer is 'shared', so the block pass must go through the
    gates): several requests of mixed prompt lengths, fewer slots than requests, greedy."""
    m = model(router, nr=nr, mod=0.5, window=window, std=0.3)
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 7, 3, 2, 9, 7, 5)]
    engine = Engine(m, max_batch=3)
    outs = engine.generate(prompts, max_new_tokens=7)
    alone = [generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=7, temperature=0))[0, len(p):].tolist()
             for p in prompts]
    assert outs == alone
    assert len({tuple(o) for o in outs}) > 1 and len(set(outs[0])) > 1  # non-degenerate streams
    with torch.no_grad():  # the MoD gates really skipped some tokens while decoding
        seq = torch.tensor([prompts[4] + outs[4]])
        mods = [r.selected for r in m(seq).records if r.group == "mod"]
    assert mods and any(bool(s.any()) and not bool(s.all()) for s in mods)


@pytest.mark.parametrize("bad", [0, -2])
def test_engine_refuses_max_batch_below_one(bad):
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model(), max_batch=bad)


def test_engine_run_raises_instead_of_spinning():
    """A request in a slot that no stage will ever move (here planted by hand) stops run() with an error."""
    engine = Engine(model(), max_batch=1)
    engine.slot_req[0] = Request([1, 2, 3], 4)  # in a slot, but its stage says DONE: no tick can move it
    with pytest.raises(RuntimeError, match="no progress"):
        engine.run()
    engine = Engine(model(), max_batch=2)  # a normal run still finishes
    assert [len(o) for o in engine.generate([[1, 2], [3], [4, 5, 6]], max_new_tokens=3)] == [3, 3, 3]
