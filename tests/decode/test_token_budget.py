"""Token-budget generation: the ladder and nearest budget, causal and train == eval on budget blocks, the engine
prefilling prompt + budget token like a full greedy forward and stopping at the end token, clear errors."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from helpers import tiny_config

from datamodules.token_budget import budget_block
from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.token_budget import budget_ladder, nearest_budget, token_budget_error
from haipai_lightning.model.decoder import HaipaiModel

V = 64
TABLE = {4: V - 3, 8: V - 2, 16: V - 1}
cfg = partial(tiny_config, vocab_size=V)


def test_ladder_and_nearest_budget():
    assert budget_ladder(4, 48, 1.25) == [4, 5, 6, 8, 10, 12, 15, 19, 24, 30, 37, 48]
    lad = budget_ladder(3, 100, 1.25)
    assert all(b / a <= 1.34 for a, b in zip(lad, lad[1:]))  # any budget in range is near a trained one
    assert [nearest_budget(TABLE, n) for n in (1, 5, 6, 7, 11, 12, 40)] == [4, 4, 8, 8, 8, 16, 16]  # log-nearest
    assert token_budget_error(8, TABLE, 20) is None
    assert "no token budgets" in token_budget_error(8, {}, 20)
    for bad in (0, 17, 8.0, True, "8"):
        assert "[1, 16]" in token_budget_error(bad, TABLE, 20)
    assert "max_new_tokens" in token_budget_error(8, TABLE, 8)


def test_budget_conditioned_training_is_causal_and_train_equals_eval():
    torch.manual_seed(0)
    model = HaipaiModel(cfg())
    tokens = np.arange(1, 2001, dtype=np.int64) % 50 + 1
    b = budget_block(tokens, np.random.default_rng(0), 40, TABLE, 0, 2, 6)
    x = b["input_ids"][None]
    train = model.train()(x).logits
    ev = model.eval()(x).logits
    torch.testing.assert_close(train, ev)  # no dropout, no batch statistics: the trained function is the eval one
    t = int((x[0] >= V - 3).nonzero()[1])  # the second budget token
    y = x.clone()
    y[0, t + 1 :] = 7  # change everything after it
    torch.testing.assert_close(model(y).logits[:, : t + 1], ev[:, : t + 1])  # causal: nothing after t leaks back


def _greedy_reference(model, prompt, n, eos, max_new):
    ids = prompt + [TABLE[nearest_budget(TABLE, n)]]
    out = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out


def test_engine_prefills_the_budget_token_and_matches_the_full_forward():
    torch.manual_seed(0)
    model = HaipaiModel(cfg()).eval()
    eos = _greedy_reference(model, [1, 2, 3], 8, -1, 4)[3]  # an end token the untrained model emits early
    engine = Engine(model, max_batch=2, budget_tokens=TABLE)
    reqs = [engine.submit(Request([1, 2, 3], 8, eos_id=eos, token_budget=n)) for n in (3, 7)]
    reqs.append(engine.submit(Request([5, 6, 7, 8, 9], 8, eos_id=eos, token_budget=7)))
    engine.run()
    for r in reqs:
        assert r.output == _greedy_reference(model, r.prompt, r.token_budget, eos, 8)
        assert r.prompt in ([1, 2, 3], [5, 6, 7, 8, 9])  # the request's prompt is left as given
    assert reqs[1].finish_reason == "stop" and reqs[1].output[-1] == eos
    plain = engine.submit(Request([1, 2, 3], 4))
    engine.run()
    assert plain.output == _plain_greedy(model, [1, 2, 3], 4)  # no budget: the prompt alone, as before


def _plain_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw,match", [
    (dict(token_budget=8), "no token budgets"),
    (dict(token_budget=0, table=True), r"\[1, 16\]"),
    (dict(token_budget=8, table=True, eos=False), "eos_id"),
    (dict(token_budget=16, table=True, max_new=16), "max_new_tokens"),
])
def test_engine_refuses_unusable_token_budgets(kw, match):
    engine = Engine(HaipaiModel(cfg()), budget_tokens=TABLE if kw.get("table") else None)
    req = Request([1, 2], kw.get("max_new", 20), eos_id=0 if kw.get("eos", True) else None, token_budget=kw["token_budget"])
    with pytest.raises(ValueError, match=f"token_budget={kw['token_budget']}.*{match}"):
        engine.submit(req)
    assert not engine.queue
