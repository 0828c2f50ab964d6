"""Adaptive attention span (arXiv 1905.07799): the soft mask, the reduction to full attention, keys beyond the
span ignored, the L1 aux loss and its record."""

from functools import partial

import torch
from helpers import attention_twin, mixer_inputs, tiny_config

from haipai_lightning.model.mixers import AdaptiveSpanAttention

B, T = 2, 12


inputs = partial(mixer_inputs, batch=B, length=T)  # (x (B, T, D), cos, sin)


def test_mask_formula():
    cfg = tiny_config(n_heads=2, n_kv_heads=1)
    m = AdaptiveSpanAttention(cfg, max_span=10, ramp=4)
    with torch.no_grad():
        m.span_frac.copy_(torch.tensor([0.5, 0.0]))  # z = 5, 0
    dist = torch.arange(12.0)[None, :]  # (1, S)
    mask = m.span_mask(dist)  # (H, 1, S)
    expect = torch.stack([((4 + z - dist) / 4).clamp(0, 1) for z in (5.0, 0.0)])
    torch.testing.assert_close(mask, expect)
    assert mask[0, 0, 5] == 1 and mask[0, 0, 9] == 0 and 0 < mask[0, 0, 7] < 1


def test_span_at_least_sequence_length_is_full_attention():
    cfg = tiny_config()
    span = AdaptiveSpanAttention(cfg, max_span=T, init_span=1.0)
    ref = attention_twin(span, cfg)
    x, cos, sin = inputs(cfg)
    torch.testing.assert_close(span(x, cos, sin), ref(x, cos, sin), atol=1e-6, rtol=0)


def test_keys_beyond_the_span_are_ignored():
    """With z + R <= d, the output at position t does not depend on tokens at positions <= t - d."""
    cfg = tiny_config()
    m = AdaptiveSpanAttention(cfg, max_span=8, ramp=2, init_span=0.25)  # z = 2: weights 0 from distance 4 on
    x, cos, sin = inputs(cfg)
    y = x.clone()
    y[:, :3] += torch.randn(B, 3, cfg.d_model)
    a, b = m(x, cos, sin), m(y, cos, sin)
    torch.testing.assert_close(a[:, 6:], b[:, 6:], atol=1e-6, rtol=0)  # position 6 sees distances <= 3 only
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-4


def test_l1_record_trains_the_spans():
    cfg = tiny_config()
    m = AdaptiveSpanAttention(cfg, max_span=16, init_span=0.5, span_loss_weight=0.1).train()
    m.layer_index = 1
    x, cos, sin = inputs(cfg)
    records = []
    m(x, cos, sin, records=records)
    (rec,) = records
    assert rec.name == "span/layer1/0" and rec.aux_weights == {"span": 0.1}
    torch.testing.assert_close(rec.aux_losses["span"], torch.tensor(8.0))
    assert float(rec.metrics["mean_span"]) == 8.0
    rec.aux_losses["span"].backward()
    assert bool((m.span_frac.grad > 0).all())  # the penalty shrinks every span
    m.eval()
    records = []
    m(x, cos, sin, records=records)
    assert records[0].aux_losses == {}


def test_lm_loss_reaches_the_spans():
    """The spans get a gradient from the output itself (through the soft ramp), not only from the L1 term."""
    cfg = tiny_config()
    m = AdaptiveSpanAttention(cfg, max_span=8, ramp=4, init_span=0.5)
    x, cos, sin = inputs(cfg)
    m(x, cos, sin).pow(2).sum().backward()
    assert m.span_frac.grad.abs().sum() > 0


def test_decoding_cache_shrinks_to_the_span_and_stays_exact():
    """Decoding drops keys no head can reach: a span layer's cache holds at most R + max z entries per row;
    the logits still equal the full forward, and greedy speculative decoding (which rolls the cache back)
    still equals plain greedy decoding."""
    from haipai_lightning.decode.speculative import speculative_generate
    from haipai_lightning.model.decoder import HaipaiModel
    from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

    torch.manual_seed(0)
    V, L = 61, 40
    mixer = partial(AdaptiveSpanAttention, max_span=16, ramp=3, init_span=0.25)  # reach R + z = 7
    m = HaipaiModel(tiny_config(vocab_size=V, max_seq_len=64), mixer=mixer, router=ExpertChoiceRouter).eval()
    x = torch.randint(0, V, (2, L))
    with torch.no_grad():
        full = m(x).logits
        cache = m.new_cache()
        steps = torch.cat([m(x[:, t:t + 1], cache=cache).logits for t in range(L)], 1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
        used = [int(layer.lengths.max()) for layer in cache.layers if layer.k is not None]
        assert used and max(used) <= 8 < L  # entries at distance < 7 from the last query, plus the new one
        ref = m.new_cache()  # the same model with the span set to the whole sequence keeps everything
        for layer in m.layers:
            layer.mixer.span_frac.data.fill_(1.0)
            layer.mixer.max_span = 64
        for t in range(L):
            m(x[:, t:t + 1], cache=ref)
        assert cache.nbytes() < ref.nbytes() / 3
        for layer in m.layers:
            layer.mixer.span_frac.data.fill_(0.25)
            layer.mixer.max_span = 16
        p = x[:1, :8]
        plain = p
        for _ in range(12):
            plain = torch.cat([plain, m(plain).logits[:, -1:].argmax(-1)], 1)
        spec, _ = speculative_generate(m, p, 12, k=3)
    assert torch.equal(spec, plain)
