"""The app in-process (Starlette's TestClient, lifespan included) on an export directory (`haipai serve --export`)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.io.export import load_pretrained
from haipai_lightning.serve.app import build_app
from serve_helpers import ROOT


@pytest.fixture(scope="module")
def app_and_model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads spin against each other on a busy 2-core machine
    model, tok = load_pretrained(ROOT / "tests" / "fixtures" / "legacy" / "export_ec")
    with TestClient(build_app(model, tok, "export_ec", max_batch=2, max_queue=2)) as client:
        yield client, model, tok
    torch.set_num_threads(before)


def test_export_serves_greedy_completions_equal_to_generate(app_and_model):
    client, model, tok = app_and_model
    ids = tok.encode("And God said").ids
    ref = generate(model, torch.tensor([ids]), SamplingConfig(12, temperature=0))[0, len(ids):].tolist()
    r = client.post("/v1/completions", json={"model": "export_ec", "prompt": "And God said", "max_tokens": 12,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode(ref)
    assert r.json()["usage"]["completion_tokens"] == 12


def test_shape_of_other_routes(app_and_model):
    client, _, _ = app_and_model
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "export_ec"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "haipai_queue_length 0.0" in client.get("/metrics").text
    r = client.post("/v1/completions", content=b"\x00")
    assert r.status_code == 400 and r.json()["error"]["param"] is None
