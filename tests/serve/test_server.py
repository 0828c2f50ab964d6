"""`haipai serve` end to end: one real server process (max_batch 4, max_queue 4) on the legacy fixture checkpoint,
queried with the `openai` client and raw HTTP. Traffic goes to 127.0.0.1 only; every loop is bounded."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from serve_helpers import MODEL, load_reference, start_server, stop_server

MAX_BATCH, MAX_QUEUE, CONTEXT = 4, 4, 64
PROMPTS = ["In the beginning", "And God said, Let there be light", "", "Blessed are the meek: for they"]


@pytest.fixture(scope="module")
def server():
    s = start_server("--max_batch", str(MAX_BATCH), "--max_queue", str(MAX_QUEUE))
    yield s
    code = stop_server(s.proc)
    assert code == 0, s.stderr()[-3000:]
    assert "Traceback" not in s.stderr(), s.stderr()[-3000:]


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="anything", max_retries=0, timeout=30)


def greedy_reference(reference, prompt: str, max_tokens: int) -> tuple[str, int, int, str]:
    """(text, prompt tokens, completion tokens, finish_reason) of `haipai generate --temperature 0`: its
    generate() call, cut at the end-of-text token as the server stops there."""
    from haipai_lightning.decode.generate import generate
    from haipai_lightning.decode.sampling import SamplingConfig

    model, tok, eos = reference
    ids = tok.encode(prompt).ids or [eos]
    out = generate(model, torch.tensor([ids]), SamplingConfig(max_tokens, temperature=0))[0, len(ids):].tolist()
    if eos in out:
        out = out[: out.index(eos) + 1]
        return tok.decode(out[:-1]), len(ids), len(out), "stop"
    return tok.decode(out), len(ids), len(out), "length"


def wait_idle(server, seconds: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while True:
        m = server.metrics()
        if m["haipai_active_slots"] == 0 and m["haipai_queue_length"] == 0:
            return m
        assert time.monotonic() < deadline, f"slots never freed: {m}"
        time.sleep(0.05)


def test_health_models_and_metrics(server, client):
    assert server.get("/health") == (200, '{"status":"ok"}')
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    m = server.metrics()
    for name in ("haipai_queue_length", "haipai_active_slots", "haipai_batch_occupancy", "haipai_max_batch",
                 "haipai_mean_recursion_depth", "haipai_completion_tokens_total", "haipai_engine_ticks_total"):
        assert name in m, name
    assert m["haipai_max_batch"] == MAX_BATCH


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_completion_equals_haipai_generate(server, client, reference, prompt):
    text, n_prompt, n_out, reason = greedy_reference(reference, prompt, 24)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_out,
                                                                                        n_prompt + n_out)
    depth = r.choices[0].mean_recursion_depth  # Haipai's extra field (n_recursions 2)
    assert depth is None if n_out == 1 else 1 <= depth <= 2  # the first token comes from the prompt's pass


def test_streaming_yields_the_same_text(server, client, reference):
    text, n_prompt, n_out, reason = greedy_reference(reference, PROMPTS[1], 30)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_out
    # raw SSE framing: data: lines, then data: [DONE]
    with httpx.stream("POST", server.base + "/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"


def test_list_prompt_seeded_sampling_and_depth_budget(client):
    kw = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, temperature=0.9, top_p=0.95, seed=5,
              extra_body={"top_k": 40, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed makes sampling reproducible
    assert a.usage.completion_tokens == 24
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                  extra_body={"depth_budget": 1})
    assert r.choices[0].mean_recursion_depth == 1.0


def test_stop_strings_end_early(client):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=40, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text  # the barely trained fixture samples odd bytes too
    stop = next(full[i:i + 2] for i in range(2, len(full) // 2)
                if all(ch.isascii() and ch.isprintable() for ch in full[i:i + 2]))
    expected = full[: full.index(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_their_sequential_outputs(server, client):
    prompts = [PROMPTS[i % 4] + " x" * (i // 4) for i in range(MAX_BATCH + 2)]  # 2 wait in the queue
    ask = lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
    sequential = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == sequential
    wait_idle(server)


BAD = [  # (body, param)
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "x", "temperature": NaN}', None),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [[1, 2], [100000]]}, "prompt"),
    ({"prompt": ["x"] * (MAX_BATCH + MAX_QUEUE + 1)}, "prompt"),
    ({"prompt": "word " * 40, "max_tokens": 40}, "prompt"),  # prompt + max_tokens beyond the context of 64
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "x", "max_tokens": CONTEXT}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 3.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_p": -1}, "top_p"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "top_k": 2.5}, "top_k"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "model": 7}, "model"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": "1"}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": "7"}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "depth_budget": 3}, "depth_budget"),
    ({"prompt": "x", "depth_budget": 0.5}, "depth_budget"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
]


def test_bad_requests_get_400_naming_the_field(server, client):
    for body, param in BAD:
        status, err = server.post("/v1/completions", body)
        assert status == 400, (body, status, err)
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, (body, err)
        assert err["error"]["message"]
    # the openai client sees the same errors as BadRequestError
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert e.value.param == "max_tokens"
    # other routes answer JSON errors too, never a 500
    assert server.get("/v1/nothing")[0] == 404
    status, text = server.get("/v1/completions")
    assert status == 405 and json.loads(text)["error"]["message"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # a body over 1 MiB: 413
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000000\r\n\r\n{")
        assert sock.recv(100).startswith(b"HTTP/1.1 413")
    m = wait_idle(server)
    assert m.get('haipai_requests_total{code="500"}', 0) == 0
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.completion_tokens >= 1


def test_full_queue_answers_429_and_the_server_keeps_serving(server, client):
    big = {"model": MODEL, "prompt": ["a"] * (MAX_BATCH + MAX_QUEUE), "max_tokens": 60, "temperature": 0,
           "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base + "/completions", json=big, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(l for l in lines if l).startswith("data: ")  # running: 4 in slots, 4 waiting
        status, err = server.post("/v1/completions", {"prompt": "x", "max_tokens": 5})
        assert status == 429 and "max_queue" in err["error"]["message"]
        rest = [l for l in lines if l]
    assert rest[-1] == "data: [DONE]"
    texts = {}
    for line in rest[:-1]:
        c = json.loads(line[6:])["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert sorted(texts) == list(range(MAX_BATCH + MAX_QUEUE))
    wait_idle(server)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).choices[0].finish_reason


def test_disconnects_free_their_slots(server, client):
    before = server.metrics()
    body = {"prompt": PROMPTS[:MAX_BATCH], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.base + "/completions", json={**body, "stream": True}, timeout=30) as r:
        assert next(l for l in r.iter_lines() if l).startswith("data: ")
    # a plain (non-streaming) request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/completions", json=body, timeout=httpx.Timeout(5, read=0.05))
    deadline = time.monotonic() + 10
    while server.metrics()["haipai_client_disconnects_total"] < before["haipai_client_disconnects_total"] + 2:
        assert time.monotonic() < deadline, "the server did not notice the disconnects"
        time.sleep(0.05)
    after = wait_idle(server)
    assert after["haipai_requests_cancelled_total"] > before["haipai_requests_cancelled_total"]
    # not every token of the 2 x 4 requests was generated: cancelled slots stopped decoding
    assert after["haipai_completion_tokens_total"] - before["haipai_completion_tokens_total"] < 2 * MAX_BATCH * 40
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:MAX_BATCH], max_tokens=8, temperature=0)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_burst_is_answered_with_200_or_429_only(server):
    def one(i):
        r = httpx.post(server.base + "/completions", timeout=30,
                       json={"prompt": PROMPTS[i % 4], "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert {s for s, _ in results} <= {200, 429}
    assert all(b["usage"]["completion_tokens"] == 30 for s, b in results if s == 200)
    assert sum(s == 200 for s, _ in results) >= MAX_BATCH
    wait_idle(server)
