"""MoR decoding with per-recursion KV caches: cached step-by-step == full forward, for every router and KV mode."""

import functools

import pytest
import torch

from haipai_lightning.config import ModelConfig
from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.speculative import speculative_generate
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

V, T = 61, 20
ROUTERS = {"full": FullRecursion, "ec": ExpertChoiceRouter,
           "ec_aux": functools.partial(ExpertChoiceRouter, aux_router=True), "tc": TokenChoiceRouter}


def model(router, kv_mode="recursion_wise", mod=0.0, seed=0, std=0.02):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      n_recursions=3, sharing="middle_cycle", kv_mode=kv_mode, mod_capacity=mod, init_std=std,
                      tie_embeddings=std == 0.02)
    m = HaipaiModel(cfg, router=ROUTERS[router]).eval()
    # Random routers at init put sigmoid(logit) near 0.5; spread the gates so that threshold
    # routing really sends different tokens to different depths in these tests.
    with torch.no_grad():
        for p in list(m.router.parameters()) + list(m.mod_gates.parameters()):
            p.mul_(40)
    return m


CASES = [(r, kv, mod) for r in ROUTERS for kv in ("recursion_wise", "shared") for mod in (0.0, 0.5)]


@pytest.mark.parametrize("router,kv,mod", CASES)
def test_cached_decoding_equals_full_forward(router, kv, mod):
    m = model(router, kv, mod)
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        out = m(x)
        full = out.logits
        cache = m.new_cache()
        pieces = [m(x[:, :7], cache=cache).logits]  # batched prefill
        pieces += [m(x[:, t : t + 1], cache=cache).logits for t in range(7, 15)]  # one token at a time
        pieces.append(m(x[:, 15:], cache=cache).logits)  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    if router != "full":  # the routing really varied the depth, so the caches are ragged
        depths = [r.selected for r in out.records if r.name.startswith("depth/")]
        assert any(bool(d.any()) and not bool(d.all()) for d in depths if d.dtype == torch.bool) or \
            len({int(v) for d in depths for v in d.flatten()}) > 1


def test_kv_cache_bytes_follow_the_mode():
    """Recursion-wise caches only the tokens active at each step; shared caches step 1 only."""
    x = torch.randint(0, V, (2, T))
    sizes = {}
    for name, router, kv in [("full", "full", "recursion_wise"), ("rw", "ec", "recursion_wise"),
                             ("shared", "ec", "shared")]:
        m = model(router, kv)
        cache = m.new_cache()
        with torch.no_grad():
            out = m(x, cache=cache)
        per_entry = 2 * 2 * 8 * 4  # k and v, 2 kv heads, head_dim 8, fp32
        sizes[name] = cache.nbytes()
        if name == "rw":
            steps = [r.selected for r in out.records]
            active = sum(int(s.sum()) for s in steps)  # tokens that ran each step, summed
            assert sizes[name] == (2 * 2 * T + 2 * active) * per_entry  # prelude+coda + 2 shared layers/step
    assert sizes["shared"] == (2 * 2 * T + 2 * 2 * T) * (2 * 2 * 8 * 4)  # step 1 only: 1/Nr of the recursions
    assert sizes["shared"] < sizes["rw"] < sizes["full"]


def test_generate_with_cache_equals_greedy_without():
    m = model("ec", "recursion_wise", 0.5)
    prompt = torch.randint(0, V, (2, 5))
    seq = generate(m, prompt, SamplingConfig(max_new_tokens=8, temperature=0))
    ref = prompt
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, m(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, ref)


def test_truncate_rolls_back_ragged_rows():
    m = model("ec")
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        cache = m.new_cache()
        m(x[:, :10], cache=cache)
        lengths = [layer.lengths.clone() for layer in cache.layers]
        m(x[:, 10:15], cache=cache)
        cache.truncate(10)
        assert all(torch.equal(layer.lengths, n) for layer, n in zip(cache.layers, lengths))
        assert cache.seen == 10
        rest = torch.cat([m(x[:, 10:15], cache=cache).logits, m(x[:, 15:], cache=cache).logits], 1)
        torch.testing.assert_close(rest, m(x).logits[:, 10:], atol=1e-5, rtol=1e-5)


def varied(router, kv="recursion_wise", mod=0.5, seed=0):
    """An untrained model whose greedy continuations vary (large init, untied head), so that
    decoding tests compare real, non-repeating token streams."""
    return model(router, kv, mod, seed, std=0.3)


@pytest.mark.parametrize("router,kv", [(r, kv) for r in ("full", "ec", "tc") for kv in ("recursion_wise", "shared")])
def test_engine_batch_equals_each_request_alone(router, kv):
    m = varied(router, kv)
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 7, 3, 2, 9, 7)]  # mixed lengths, some equal
    engine = Engine(m, max_batch=3)  # fewer slots than requests: FIFO refills
    outs = engine.generate(prompts, max_new_tokens=6)
    alone = [generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=6, temperature=0))[0, len(p):].tolist()
             for p in prompts]
    assert outs == alone
    assert len({tuple(o) for o in outs}) > 1 and len(set(outs[0])) > 1  # non-degenerate streams
    # depth-wise batching: tokens at different depths shared block passes
    assert engine.stats["block_tokens"] > engine.stats["block_passes"]


def test_engine_depth_budget_caps_mean_depth():
    m = varied("full")
    engine = Engine(m, max_batch=2)
    reqs = [engine.submit(Request([1, 2, 3], 8, depth_budget=b)) for b in (1.0, 1.5, None)]
    engine.run()
    assert reqs[0].depths == [1] * 7  # 7 generated tokens were processed (the 8th is only sampled)
    assert sum(reqs[1].depths) / 7 <= 1.5 and max(reqs[1].depths) > 1
    assert reqs[2].depths == [3] * 7
    with pytest.raises(ValueError, match="max_len"):
        engine.submit(Request([1] * 60, 10))


@pytest.mark.parametrize("router,kv", [("ec", "recursion_wise"), ("ec", "shared"), ("tc", "recursion_wise"),
                                       ("tc", "shared")])
def test_speculative_greedy_equals_plain_greedy(router, kv):
    m = varied(router, kv)
    p = torch.randint(0, V, (1, 5))
    ref = generate(m, p, SamplingConfig(max_new_tokens=15, temperature=0))
    stats = []
    for draft in ({"draft_depth": 1}, {"draft_depth": 2}, {"draft": varied("full", seed=9)}):
        out, st = speculative_generate(m, p, 15, k=3, **draft)
        assert torch.equal(out, ref)
        stats.append(st["acceptance"])
    assert min(stats) < 1.0  # some proposals were rejected, so the rollback path ran
