"""Caches shrink to the stated budget; compression is causal; the engine, generate and perplexity hooks."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from helpers import tiny_config
from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.evaluator import calibrate_heads, ehpc_scores
from haipai_lightning.compress.prefill import compressed_prefill
from haipai_lightning.compress.reform import recurrent_pass
from haipai_lightning.decode.engine import Engine
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.eval.perplexity import perplexity
from haipai_lightning.model.decoder import HaipaiModel

cfg = partial(tiny_config, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HaipaiModel(cfg()).eval()


@pytest.mark.parametrize("method", ["ehpc", "reform", "recent", "random"])
@pytest.mark.parametrize("mode", ["recompute", "evict"])
def test_every_application_caches_exactly_the_budget(model, method, mode):
    ids = torch.randint(0, 128, (2, 64))
    cc = CompressConfig(method=method, budget=0.25, mode=mode, chunk=16, window=4, sink=2)
    cache, _, rec = compressed_prefill(model, ids, cc)
    assert rec.kept == [16] * len(model.order) and rec.kept_fraction == 0.25
    full = model.new_cache(96)
    model(ids, cache=full)
    assert rec.kv_bytes * 4 == full.nbytes()
    _, _, pos = cache[len(model.order) - 1].read()
    assert set(range(2)) | set(range(60, 64)) <= set(pos[0].tolist())  # sinks and the window always kept
    if method == "recent":
        assert pos[0].tolist() == [0, 1, *range(50, 64)]


def test_decoding_after_a_compressed_prefill_is_causal(model):
    """Continuations that agree up to step t give the same logits up to t: no decision looks ahead."""
    ids = torch.randint(0, 128, (1, 48))
    tail_a = torch.randint(0, 128, (1, 6))
    tail_b = tail_a.clone()
    tail_b[0, 3:] = (tail_b[0, 3:] + 1) % 128
    cc = CompressConfig(method="ehpc", budget=0.3, window=4)
    outs = []
    for tail in (tail_a, tail_b):
        cache, _, _ = compressed_prefill(model, ids, cc)
        outs.append(model(tail, cache=cache).logits)
    assert torch.equal(outs[0][:, :3], outs[1][:, :3]) and not torch.equal(outs[0][:, 3:], outs[1][:, 3:])


def test_reform_embeddings_and_evictions_never_look_ahead(model):
    ids = torch.randint(0, 128, (1, 64))
    other = ids.clone()
    other[0, 40:] = (other[0, 40:] + 7) % 128
    cc = CompressConfig(method="reform", budget=0.25, chunk=16, window=4, embed_app=1)
    e1, info = recurrent_pass(model, ids, cc)
    e2, _ = recurrent_pass(model, other, cc)
    assert torch.equal(e1[:, :40], e2[:, :40]) and not torch.equal(e1[:, 40:], e2[:, 40:])
    assert info["peak_carried_entries"] <= 16 + 16  # the carried cache: budget + one chunk at most


def test_ehpc_calibration_finds_the_heads_that_look_at_the_needle(model):
    ids = torch.randint(0, 128, (4, 40))
    important = torch.zeros_like(ids, dtype=torch.bool)
    important[:, 10:13] = True
    cc = CompressConfig(method="ehpc", window=4, evaluator_apps=2)
    heads, mass = calibrate_heads(model, ids, important, cc, n_heads=3)
    assert mass.shape == (2, 4) and len(heads) == 3
    ranked = [float(mass[a, h]) for a, h in heads]
    assert ranked == sorted(ranked, reverse=True) and ranked[0] == float(mass.max())
    cc.heads = heads[:1]  # scoring with one head is that head's attention from the window
    s = ehpc_scores(model, ids, cc)
    assert s.shape == ids.shape and torch.allclose(s.sum(1), torch.ones(4), atol=1e-5)


def test_engine_with_compression_matches_generate(model):
    prompts = [torch.randint(0, 128, (40,)).tolist() for _ in range(2)]
    cc = CompressConfig(method="ehpc", budget=0.25, window=4)
    eng = Engine(model, max_batch=2, max_len=96, compress=cc)
    outs = eng.generate(prompts, max_new_tokens=4)
    s = SamplingConfig(max_new_tokens=4, temperature=0.0)
    for p, o in zip(prompts, outs):
        assert generate(model, torch.tensor([p]), s, compress=cc)[0, 40:].tolist() == o


def test_perplexity_with_a_full_budget_scores_like_the_plain_model(model):
    ids = torch.randint(0, 128, (3 * 33,))
    res = perplexity(model, ids, 32, compress=CompressConfig(method="recent", budget=1.0), compress_tail=8)
    assert res.tokens == 3 * 9
    with torch.no_grad():
        logits = model(ids[None, :32]).logits[0, 23:32].float()  # block 0: tokens 24..32 from their full context
    ref = torch.nn.functional.cross_entropy(logits, ids[24:33], reduction="none")
    small = perplexity(model, ids[:33], 32, compress=CompressConfig(method="recent", budget=1.0), compress_tail=8)
    assert abs(small.nll - float(ref.mean())) < 1e-5
    squeezed = perplexity(model, ids, 32, compress=CompressConfig(method="recent", budget=0.2), compress_tail=8)
    assert squeezed.tokens == res.tokens and squeezed.nll != res.nll
