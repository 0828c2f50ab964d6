"""POST /v1/completions body validation (the live server's table of bad requests is in test_server.py)."""

from __future__ import annotations

import json

import pytest

from haipai_lightning.serve.protocol import APIError, ServedModel, parse_completion

SERVED = ServedModel(id="m", max_len=64, vocab_size=300, n_recursions=3, eos_id=0, max_prompts=6)


def encode(text: str) -> list[int]:
    return [1 + ord(c) % 200 for c in text]  # one token per character


def parse(**body):
    return parse_completion(json.dumps(body).encode(), SERVED, encode)


def refused(**body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"
    return e.value


def test_openai_defaults():
    p = parse(prompt="hi")
    assert p.prompts == [encode("hi")]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop, p.seed, p.stream) == (16, 1.0, 1.0, None, (), None,
                                                                                          False)
    assert parse(prompt="").prompts == [[0]]  # "" = the end-of-text token, as `haipai generate --prompt ""`


def test_prompt_forms():
    assert parse(prompt=["a", "bc"]).prompts == [encode("a"), encode("bc")]
    assert parse(prompt=[5, 6, 7]).prompts == [[5, 6, 7]]
    assert parse(prompt=[[5], [6, 7]]).prompts == [[5], [6, 7]]
    assert refused(prompt=[[5], []]).param == "prompt"
    assert refused(prompt=[-1]).param == "prompt"
    assert refused(prompt=[True]).param == "prompt"
    assert refused(prompt=["a"] * 7).param == "prompt"  # more than max_batch + max_queue could ever hold


def test_context_limits():
    assert parse(prompt="x" * 14, max_tokens=50).max_tokens == 50  # 14 + 50 = 64 fits
    e = refused(prompt="x" * 15, max_tokens=50)
    assert e.param == "prompt" and e.code == "context_length_exceeded" and "64" in e.message
    assert refused(prompt="x", max_tokens=64).param == "max_tokens"


def test_sampling_fields():
    p = parse(prompt="x", temperature=0, top_p=0.5, top_k=7, seed=3, stop="##", depth_budget=2, ignore_eos=True,
              stream=True, stream_options={"include_usage": True}, n=1, user="u", logprobs=None, echo=False)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.depth_budget, p.ignore_eos, p.include_usage) == (
        0.0, 0.5, 7, 3, ("##",), 2.0, True, True)
    assert parse(prompt="x", top_k=-1).top_k is None and parse(prompt="x", top_k=0).top_k is None
    assert refused(prompt="x", temperature=True).param == "temperature"
    assert refused(prompt="x", depth_budget=3.5).param == "depth_budget"
    assert refused(prompt="x", stream_options={"include_usage": True}).param == "stream_options"
    assert refused(prompt="x", stream=True, stream_options={"other": 1}).param == "stream_options"
    assert refused(prompt="x", frequency_penalty=1).param == "frequency_penalty"
    assert refused(prompt="x", logit_bias={"1": 5}).param == "logit_bias"
    assert refused(prompt="x", user=5).param == "user"


def test_malformed_bodies_name_no_field():
    for raw in (b"", b"{", b'"text"', b"null", b'{"prompt": Infinity}', b"\xff\xfe"):
        with pytest.raises(APIError) as e:
            parse_completion(raw, SERVED, encode)
        assert e.value.param is None and e.value.status == 400
