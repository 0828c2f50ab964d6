"""haipai reformulate (MGA, arXiv 2502.04235): exact fan-out and schema with a stub and with real small models,
exact resume after a crash, the OpenAI-compatible backend, and the output mixed with the original at a weight."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.corpus import load_documents
from datamodules.reformulate import (ReformulateConfig, _sha, check_fanout, parse_pairs, read_reformulations,
                                     reformulate)
from datamodules.reformulate_lm import Decoding, HaipaiLM, OpenAILM
from haipai_lightning.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"text", "source", "source_id", "source_sha256", "variant", "genre", "audience", "pair_source", "model"}
DOCS = ["The first document.", "A second one, longer than the first.", "Third.", "Fourth text here.", "Fifth."]


class StubLM:
    """Proposes two good pairs and a broken line; rewrites into a text naming the pair and the document."""

    name = "stub"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def complete(self, prompts, d):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        out = []
        for p in prompts:
            doc = p.split("Document:\n", 1)[1].split("\n\n", 1)[0]
            if "propose" in p:
                out.append(f"genre: lecture | audience: pupils of {doc[:5]}\n1. nonsense\ngenre: memo | audience: boss\n")
            else:
                genre_for = p.rsplit("\n\n", 1)[1].rstrip(":\n")
                out.append(f"  [{genre_for}] {doc}  ")
        return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return str(p)


def test_parse_pairs():
    text = "genre: FAQ | audience: kids\nGenre = poem|Audience = poets.\ngenre: FAQ | audience: kids\nrubbish"
    assert parse_pairs(text, 5) == [("FAQ", "kids"), ("poem", "poets")]
    assert parse_pairs(text, 1) == [("FAQ", "kids")]


def test_fanout_and_schema_are_exact_with_a_stub(source, tmp_path):
    out = tmp_path / "mga.jsonl"
    index = reformulate(source, out, StubLM(), ReformulateConfig(k=3, batch_size=2))
    recs = read_reformulations(out)
    assert index["done"] == len(DOCS) and len(recs) == 3 * len(DOCS)
    check_fanout(recs, 3)
    for r in recs:
        assert set(r) == KEYS and r["source"] == source and r["model"] == "stub"
        doc = DOCS[r["source_id"]]
        assert r["source_sha256"] == _sha(doc)
        assert r["text"] == f"[{r['genre']} for {r['audience']}] {doc}"  # the rewrite of this doc for this pair
    first = [r for r in recs if r["source_id"] == 0]
    assert [(r["genre"], r["audience"], r["pair_source"]) for r in first][:2] == [
        ("lecture", "pupils of The f", "model"), ("memo", "boss", "model")]
    assert first[2]["pair_source"] == "fallback" and (first[2]["genre"], first[2]["audience"]) not in {
        ("lecture", "pupils of The f"), ("memo", "boss")}
    # a data source like any other: the text field loads, one document per reformulation
    assert load_documents(str(out)) == [r["text"] for r in recs]


def test_interrupted_run_resumes_without_duplicates(source, tmp_path):
    cfg = ReformulateConfig(k=2, batch_size=2)
    ref = tmp_path / "ref.jsonl"
    reformulate(source, ref, StubLM(), cfg)
    out = tmp_path / "mga.jsonl"
    with pytest.raises(KeyboardInterrupt):  # 2 LM calls per batch: dies in the second batch's rewrites
        reformulate(source, out, StubLM(fail_after=3), cfg)
    with open(out, "ab") as f:  # and a crash in the middle of a write leaves half a line behind
        f.write(b'{"text": "half a li')
    index = json.loads((tmp_path / "mga.jsonl.index.json").read_text())
    assert index["done"] == 2
    lm = StubLM()
    reformulate(source, out, lm, cfg)
    assert lm.calls == 2 * 2  # only the 3 documents left: 2 batches, 2 calls each
    assert out.read_bytes() == ref.read_bytes()  # exactly the uninterrupted run: nothing lost, nothing twice
    reformulate(source, out, StubLM(fail_after=0), cfg)  # all done: no LM call at all
    assert out.read_bytes() == ref.read_bytes()


def test_other_settings_or_foreign_files_are_refused(source, tmp_path):
    out = tmp_path / "mga.jsonl"
    reformulate(source, out, StubLM(), ReformulateConfig(k=2))
    with pytest.raises(ConfigError, match="other settings"):
        reformulate(source, out, StubLM(), ReformulateConfig(k=3))
    reformulate(source, out, StubLM(), ReformulateConfig(k=3), overwrite=True)
    check_fanout(read_reformulations(out), 3)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("precious\n")
    with pytest.raises(ConfigError, match="not written by haipai reformulate"):
        reformulate(source, mine, StubLM())
    assert mine.read_text() == "precious\n"
    with pytest.raises(ConfigError, match="k 0"):
        ReformulateConfig(k=0)


def test_real_small_haipai_checkpoint(source, tmp_path):
    lm = HaipaiLM(str(ROOT / "tests" / "fixtures" / "legacy" / "ec_mod.ckpt"))
    cfg = ReformulateConfig(k=2, batch_size=4, max_document_chars=60, pair_tokens=8,
                            decoding=Decoding(max_new_tokens=6, temperature=0.8, seed=1))
    out = tmp_path / "mga.jsonl"
    reformulate(source, out, lm, cfg, max_documents=3)
    recs = read_reformulations(out)
    check_fanout(recs, 2)
    assert len(recs) == 6 and all(set(r) == KEYS and r["model"].startswith("haipai:") for r in recs)
    assert all(r["pair_source"] == "fallback" for r in recs)  # a random small model proposes no well-formed pair


def test_real_small_transformers_model(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    from datamodules.tokenizer import train_tokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(DOCS * 4, 300),
                                               eos_token="<|endoftext|>", pad_token="<|pad|>")
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=16, n_layer=1, n_head=2)
    folder = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)  # randomly initialised, built here: no download
    tok.save_pretrained(folder)
    from datamodules.reformulate_lm import TransformersLM

    out = tmp_path / "mga.jsonl"
    reformulate(source, out, TransformersLM(str(folder)), ReformulateConfig(
        k=2, batch_size=3, pair_tokens=4, decoding=Decoding(max_new_tokens=5, temperature=0.0)))
    recs = read_reformulations(out)
    check_fanout(recs, 2)
    assert len(recs) == 10 and all(set(r) == KEYS and r["model"] == f"transformers:{folder}" for r in recs)


def test_openai_compatible_endpoint(source, tmp_path):
    """Against a tiny local HTTP server speaking /v1/completions: prompts go out in order, texts come back by index."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(body)
            prompts = body["prompt"]
            choices = [{"index": i, "text": f"genre: g{i} | audience: a{i}" if "propose" in p else f"R{i}",
                        "finish_reason": "length", "logprobs": None} for i, p in enumerate(prompts)][::-1]
            data = json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                               "choices": choices}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lm = OpenAILM("served", f"http://127.0.0.1:{server.server_port}/v1")
        out = tmp_path / "mga.jsonl"
        reformulate(source, out, lm, ReformulateConfig(k=1, batch_size=5))
    finally:
        server.shutdown()
    recs = read_reformulations(out)
    assert [r["text"] for r in recs] == [f"R{i}" for i in range(5)]  # choices matched by index, not by order
    assert [(r["genre"], r["audience"]) for r in recs] == [(f"g{i}", f"a{i}") for i in range(5)]
    assert seen[0]["model"] == "served" and len(seen[0]["prompt"]) == 5 and seen[0]["max_tokens"] == 64


def test_output_mixes_with_the_original_at_a_weight(source, tmp_path):
    from datamodules.prepare import prepare
    from datamodules.streaming import StreamingDataModule

    out = tmp_path / "mga.jsonl"
    reformulate(source, out, StubLM(), ReformulateConfig(k=3))
    orig, mga = tmp_path / "orig", tmp_path / "mga"  # the original documents and their rewrites, one tokenizer
    prepare(source=source, out=str(orig), vocab_size=300, val_fraction=0.0, workers=1)
    prepare(source=str(out), out=str(mga), tokenizer=str(orig / "tokenizer.json"), val_fraction=0.0, workers=1)
    m = StreamingDataModule([str(orig), str(mga)], weights=[0.75, 0.25], seq_len=4, batch_size=2, val_fraction=0.2)
    m.setup("fit")
    d, _ = m.train_stream().draws(np.arange(8000))
    assert abs(np.mean(d == 1) - 0.25) < 0.02
