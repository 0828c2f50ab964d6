"""Reductions to the uncompressed model: a budget >= the context (or merge ratios of 0) changes nothing."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from helpers import tiny_config
from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.prefill import compressed_prefill
from haipai_lightning.config import ConfigError
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

cfg = partial(tiny_config, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HaipaiModel(cfg()).eval()


@pytest.mark.parametrize("method", ["ehpc", "reform", "recent", "random", "merge"])
@pytest.mark.parametrize("mode", ["recompute", "evict"])
def test_full_budget_gives_the_uncompressed_logits(model, method, mode):
    ids = torch.randint(0, 128, (2, 40))
    full = model(ids).logits[:, -1]
    cc = CompressConfig(method=method, budget=1.0, mode=mode, chunk=16, window=4)
    _, logits, rec = compressed_prefill(model, ids, cc)
    assert torch.equal(logits, full)
    assert rec.kept == [40] * len(model.order) and rec.kept_fraction == 1.0


@pytest.mark.parametrize("method", ["ehpc", "reform", "merge"])
def test_full_budget_generates_what_generate_does(model, method):
    ids = torch.randint(0, 128, (1, 30))
    s = SamplingConfig(max_new_tokens=6, temperature=0.0)
    records: list = []
    out = generate(model, ids, s, compress=CompressConfig(method=method, budget=64, chunk=8), records=records)
    assert torch.equal(out, generate(model, ids, s))
    assert records[0].method == method and records[0].context == 30


def test_routed_mor_model_full_budget_is_exact():
    """Expert-choice MoR at inference routes causally (threshold), so recomputing every token is the forward."""
    torch.manual_seed(1)
    m = HaipaiModel(cfg(), router=partial(ExpertChoiceRouter)).eval()
    ids = torch.randint(0, 128, (2, 33))
    _, logits, _ = compressed_prefill(m, ids, CompressConfig(method="ehpc", budget=1.0))
    assert torch.equal(logits, m(ids).logits[:, -1])
    with pytest.raises(ConfigError, match="router"):  # merging runs applications itself: routed MoR is refused
        compressed_prefill(m, ids, CompressConfig(method="merge", merge_ratios=[0.3] * len(m.order)))


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="compress.method"):
        CompressConfig(method="h2o")
    with pytest.raises(ConfigError, match="compress.budget"):
        CompressConfig(budget=0)
    with pytest.raises(ConfigError, match="merge_ratios"):
        CompressConfig(merge_ratios=[1.5])
