"""Token merging: proportional attention is exact for duplicates; merges keep causal order; optuna tunes ratios."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from helpers import tiny_config
from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.merge import SizedKV, merge_step, merged_prefill
from haipai_lightning.compress.merge_tune import tune_ratios
from haipai_lightning.model.cache import LayerKV
from haipai_lightning.model.decoder import HaipaiModel

cfg = partial(tiny_config, max_seq_len=96)


def _attend(kv, q, k_new, v_new, pos):
    keys, vals, mask = kv.update(k_new, v_new, pos)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)


def test_merging_a_duplicated_token_with_proportional_attention_changes_nothing():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 3, 8)  # (B, Hkv, T, hd): tokens 0, 1 and a duplicate of token 1
    v = torch.randn(1, 2, 3, 8)
    k[:, :, 2], v[:, :, 2] = k[:, :, 1], v[:, :, 1]
    plain = LayerKV(16)
    plain.update(k, v, torch.arange(3)[None])
    merged = SizedKV(16)
    merged.pending = torch.tensor([[0.0, math.log(2.0)]])  # token 1 stands for two tokens
    merged.update(k[:, :, :2], v[:, :, :2], torch.tensor([[0, 2]]))
    q, kq, vq = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    a = _attend(plain, q, kq, vq, torch.tensor([[3]]))
    b = _attend(merged, q, kq, vq, torch.tensor([[3]]))
    assert torch.allclose(a, b, atol=1e-6)
    assert merged.lengths.item() == 3 and plain.lengths.item() == 4  # one entry fewer
    unweighted = LayerKV(16)  # without the log-size the merged cache would attend differently
    unweighted.update(k[:, :, :2], v[:, :, :2], torch.tensor([[0, 2]]))
    assert not torch.allclose(a, _attend(unweighted, q, kq, vq, torch.tensor([[3]])), atol=1e-4)


def test_merge_step_is_size_weighted_causal_and_protects_the_tail():
    torch.manual_seed(0)
    B, T, D = 2, 12, 6
    h = torch.randn(B, T, D)
    keys = torch.randn(B, T, 4)
    keys[:, 2] = keys[:, 3]  # slots 2 (A) and 3 (B) identical keys: the best match
    pos = torch.arange(T).expand(B, T)
    logs = torch.zeros(B, T)
    logs[:, 2] = math.log(3.0)
    h2, pos2, logs2 = merge_step(h, keys, pos, logs, r=1, protect=4)
    assert h2.shape == (B, T - 1, D)
    assert 2 not in pos2[0].tolist() and 3 in pos2[0].tolist()  # merged into the later token: causal
    j = pos2[0].tolist().index(3)
    assert torch.allclose(h2[:, j], (3 * h[:, 2] + h[:, 3]) / 4, atol=1e-6)  # size-weighted mean
    assert torch.allclose(logs2[:, j].exp(), torch.tensor(4.0))
    assert torch.equal(h2[:, -4:], h[:, -4:]) and torch.equal(pos2[:, -4:], pos[:, -4:])  # the tail untouched
    assert bool((pos2[:, 1:] > pos2[:, :-1]).all())  # order kept
    h3, pos3, _ = merge_step(h, keys, pos, logs, r=100, protect=4)  # at most one A token per pair
    assert h3.size(1) == T - (T - 4) // 2


def test_merged_prefill_shrinks_every_application_and_decodes():
    torch.manual_seed(0)
    m = HaipaiModel(cfg()).eval()
    ids = torch.randint(0, 128, (2, 64))
    cc = CompressConfig(method="merge", window=8, merge_ratios=[0.5, 0.3, 0.0, 0.3, 0.2])
    cache, logits, applied = merged_prefill(m, ids, cc, 80)
    kept = [int(cache[a].lengths[0]) for a in range(len(m.order))]
    assert kept[0] == 64 - int(0.5 * 56) and all(x <= y for x, y in zip(kept[1:], kept))
    assert applied[2] == 0.0 and kept[2] == kept[1]
    assert cache.seen == 64
    out = m(logits.argmax(-1)[:, None], cache=cache).logits  # decoding continues with proportional attention
    assert torch.isfinite(out).all() and int(cache[0].lengths[0]) == kept[0] + 1


def test_optuna_picks_ratios_within_the_budget():
    torch.manual_seed(0)
    m = HaipaiModel(cfg()).eval()
    ids = torch.randint(0, 128, (2, 32))
    res = tune_ratios(m, ids, torch.randint(0, 128, (2,)), CompressConfig(method="merge", budget=0.6, window=4),
                      n_trials=4)
    assert len(res.ratios) == len(m.order) and res.trials == 4
    assert res.kv_fraction <= 0.6 + 1e-9  # the enqueued geometric schedule meets the budget, the penalty keeps it
