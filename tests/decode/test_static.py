"""StaticDecoder (the fast decode path of dense stacks): its logits are the model's, generate's tokens are the
general path's, unsupported models fall back, int8 weights stay close, compile off and on agree."""

import pytest
import torch

from haipai_lightning.config import ModelConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.static import StaticDecoder
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

V = 61


def dense(nr=1, seed=0, **kw):
    torch.manual_seed(seed)
    router = kw.pop("router", FullRecursion)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=40,
                      n_recursions=nr, sharing="middle_cycle", **kw)
    return HaipaiModel(cfg, router=router).eval()


@pytest.mark.parametrize("nr", [1, 2])  # vanilla, and a recursive stack without routing (shared weights, a cache per step)
def test_static_logits_equal_full_forward(nr):
    m = dense(nr)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = m(x).logits
        dec = StaticDecoder(m, batch=2, max_len=20)
        pieces = [dec.forward(x[:, :7])]  # prefill
        pieces += [dec.step(x[:, t:t + 1])[:, None] for t in range(7, 15)]  # one token at a time
        pieces.append(dec.forward(x[:, 15:]))  # a chunk after a prefix (speculative verification's shape)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 2 rows x 20 positions"):
        dec.step(x[:, :1])  # full


def test_generate_fast_equals_general_path_and_tracks_weight_changes():
    m = dense()
    x = torch.randint(0, V, (3, 5))
    s = SamplingConfig(max_new_tokens=12, temperature=0)
    assert torch.equal(generate(m, x, s), generate(m, x, s, fast=False))
    s2 = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=10, seed=3)
    assert torch.equal(generate(m, x, s2), generate(m, x, s2, fast=False))  # same logits -> same samples
    with torch.no_grad():  # an in-place update (an optimizer step) must not leave a stale decoder behind
        m.layers[2].mlp.w2.weight.mul_(-3.0)
        m.head.weight.add_(0.05 * torch.randn_like(m.head.weight))
    assert torch.equal(generate(m, x, s), generate(m, x, s, fast=False))


@pytest.mark.parametrize("kw,why", [
    (dict(nr=3, router=ExpertChoiceRouter), "routes tokens"),
    (dict(mod_capacity=0.5), "Mixture-of-Depths"),
    (dict(nr=3, kv_mode="shared"), "kv_mode=shared"),
])
def test_unsupported_models_are_refused_and_generate_falls_back(kw, why):
    m = dense(**kw)
    assert why in StaticDecoder.unsupported(m)
    with pytest.raises(ValueError, match="general path"):
        StaticDecoder(m, 1, 10)
    x = torch.randint(0, V, (1, 4))
    s = SamplingConfig(max_new_tokens=4, temperature=0)
    assert torch.equal(generate(m, x, s), generate(m, x, s, fast=False))


def test_windowed_attention_is_refused():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=40)
    m = HaipaiModel(cfg, mixer=lambda c: Attention(c, window=4)).eval()
    assert "window" in StaticDecoder.unsupported(m)


def test_int8_weights_stay_close_to_fp32():
    m = dense(init_std=0.2)  # larger weights: logits far from uniform, so the comparison means something
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        ref = StaticDecoder(m, 1, 12).forward(x)
        q = StaticDecoder(m, 1, 12, weights="int8").forward(x)
    rel = (q - ref).norm() / ref.norm()
    assert rel < 0.15, rel  # 8-bit weights, 7-bit activations: ~8% of the logits' norm here (random: ~140%)
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    with pytest.raises(ValueError, match="weights='int4'"):
        StaticDecoder(m, 1, 12, weights="int4")


def test_compile_off_and_on_give_the_same_tokens():
    """The compiled step (static shapes: the whole buffer under a position mask) against the eager one.
    aot_eager traces and functionalizes the same graph inductor compiles, without generating C++ (cheap)."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    m = HaipaiModel(cfg).eval()
    x = torch.randint(0, V, (2, 4))
    s = SamplingConfig(max_new_tokens=3, temperature=0)
    eager = generate(m, x, s)
    compiled = generate(m, x, s, compile="aot_eager")  # a failure to compile our step is a failure, not a skip
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("bits", [8, 4])
def test_engine_with_quantized_kv_equals_each_request_alone(bits):
    """kv8 / kv4 caches in the depth-wise batching engine: the engine stores codes (not floats) and its
    greedy outputs equal each request decoded alone through the model's own quantized cache."""
    from haipai_lightning.decode.engine import Engine
    from haipai_lightning.quant.kv_cache import QuantKVCacheFactory, QuantLayerKV

    m = dense(nr=3, init_std=0.3, router=ExpertChoiceRouter, tie_embeddings=False)
    with torch.no_grad():
        for p in m.router.parameters():
            p.mul_(40)  # spread the gates: tokens really take different depths
    m.kv_cache_factory = QuantKVCacheFactory(bits)
    assert "quantized KV" in StaticDecoder.unsupported(m)
    torch.manual_seed(1)
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 6, 3, 5)]
    engine = Engine(m, max_batch=2)
    outs = engine.generate(prompts, max_new_tokens=5)
    assert all(type(kv) is QuantLayerKV for kv in engine.kv_block)
    assert engine.kv_block[0].k.dtype == (torch.int8 if bits == 8 else torch.uint8)
    alone = [generate(m, torch.tensor([p]), SamplingConfig(max_new_tokens=5, temperature=0))[0, len(p):].tolist()
             for p in prompts]
    assert outs == alone
    assert len({tuple(o) for o in outs}) > 1
