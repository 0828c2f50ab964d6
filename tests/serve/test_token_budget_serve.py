"""The `token_budget` request field: validated like every field (one message naming it), and a model trained
with budget tokens serves it -- the completion is the engine's generation for that budget."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from haipai_lightning.config import ModelConfig
from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.token_budget import budget_token_names, budget_tokens
from haipai_lightning.io.export import load_pretrained
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.serve.app import build_app
from haipai_lightning.serve.protocol import APIError, ServedModel, parse_completion
from serve_helpers import ROOT

BUDGETS = ((4, 300), (8, 301), (16, 302))
SERVED = ServedModel(id="m", max_len=64, vocab_size=303, n_recursions=1, eos_id=0, max_prompts=4, budget_tokens=BUDGETS)


def parse(served=SERVED, **body):
    return parse_completion(json.dumps(body).encode(), served, lambda s: [1 + ord(c) % 200 for c in s])


def test_the_field_is_parsed_and_validated():
    assert parse(prompt="x", token_budget=8, max_tokens=20).token_budget == 8
    assert parse(prompt="x").token_budget is None
    for bad, says in [(0, "[1, 16]"), (17, "[1, 16]"), (8.5, "[1, 16]"), ("8", "[1, 16]"), (True, "[1, 16]"),
                      (12, "max_tokens=12")]:
        with pytest.raises(APIError) as e:
            parse(prompt="x", token_budget=bad, max_tokens=12)
        assert e.value.param == "token_budget" and says in e.value.message and e.value.status == 400
    with pytest.raises(APIError, match="ignore_eos must be false"):
        parse(prompt="x", token_budget=8, max_tokens=20, ignore_eos=True)
    plain = ServedModel(id="m", max_len=64, vocab_size=303, n_recursions=1, eos_id=0, max_prompts=4)
    with pytest.raises(APIError, match="knows no token budgets"):
        parse(plain, prompt="x", token_budget=8, max_tokens=20)
    with pytest.raises(APIError) as e:  # the budget token counts against the context
        parse(prompt=[5] * 44, token_budget=8, max_tokens=20)
    assert e.value.code == "context_length_exceeded"


def test_a_budget_model_serves_token_budget_completions():
    _, tok = load_pretrained(ROOT / "tests" / "fixtures" / "legacy" / "export_ec")
    tok.add_special_tokens(budget_token_names([4, 8, 16]))
    table = budget_tokens(tok)
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = HaipaiModel(ModelConfig(vocab_size=max(table.values()) + 1, d_model=32, n_layers=2, n_heads=4,
                                    ffn_hidden=64, max_seq_len=64, sharing="cycle")).eval()
    ids = tok.encode("And God said").ids
    engine = Engine(model, max_batch=1, budget_tokens=table)
    ref = engine.submit(Request(ids, 12, eos_id=eos, token_budget=8))
    engine.run()
    with TestClient(build_app(model, tok, "budget", max_batch=2, max_queue=2)) as client:
        r = client.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 12, "temperature": 0,
                                                 "token_budget": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(ref.output)
        assert r.json()["usage"]["completion_tokens"] == len(ref.output)
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 12, "token_budget": 40})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "token_budget"
