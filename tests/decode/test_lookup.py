"""LMLM decoding: the SQLite fact store, token hooks in generate / engine / server, and a briefly trained
model that writes the lookup call and says what the (edited) store says."""

import json

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from datamodules import TextDataModule
from datamodules.biographies import RELATIONS, corpus, question
from datamodules.lmlm import END, RETURN, Fact, call
from haipai_lightning.config import ModelConfig
from haipai_lightning.decode.engine import Engine, Request
from haipai_lightning.decode.generate import generate
from haipai_lightning.decode.lookup import UNKNOWN, FactStore, LookupHook, readable
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.serve.app import build_app

GREEDY = SamplingConfig(max_new_tokens=20, temperature=0.0)


def test_store_matches_keys_without_case_and_edits_in_place(tmp_path):
    store = FactStore.from_facts(tmp_path / "f.db", [Fact("Ada Byron", "birthplace", "Leeds")])
    assert store.get("  ada  BYRON ", "Birthplace") == "Leeds" and store.get("Ada Byron", "employer") is None
    store.put("ADA BYRON", "birthplace", "Oslo")  # same key: replaced, not added
    assert len(store) == 1 and store.get("Ada Byron", "birthplace") == "Oslo"
    store.close()
    assert FactStore(tmp_path / "f.db").get("ada byron", "birthplace") == "Oslo"  # persisted
    with pytest.raises(FileNotFoundError, match="fact store"):
        FactStore(tmp_path / "missing.db")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer d=32 model trained 180 steps on annotated biographies of 12 people (value-masked loss)."""
    d = tmp_path_factory.mktemp("lookup")
    docs, fs = corpus(12, copies=4, seed=0)
    (d / "bios.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    dm = TextDataModule(source=str(d / "bios.jsonl"), seq_len=48, batch_size=8, vocab_size=384, lmlm=True,
                        val_fraction=0.05, cache_dir=str(d / "cache"))
    dm.setup()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=dm.vocab_size_actual, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=80, n_recursions=1, sharing="cycle")
    model = HaipaiModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = 0
    while step < 180:
        for b in dm.train_dataloader():
            loss = F.cross_entropy(model(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 180:
                break
    return model.eval(), dm.tokenizer, fs, d


def _ask(model, tok, fs, hook):
    """Greedy answers (as a reader sees them) to each fact's question, batched by prompt length."""
    groups = {}
    for f in fs:
        ids = tok.encode(question(f.entity, f.relation)).ids
        groups.setdefault(len(ids), []).append((f, ids))
    out = {}
    for n, group in groups.items():
        y = generate(model, torch.tensor([ids for _, ids in group]), GREEDY, hook=hook)
        out.update({f: readable(tok, row) for (f, _), row in zip(group, y[:, n:].tolist())})
    return out


def test_trained_model_looks_up_and_follows_an_edited_store(trained):
    model, tok, fs, d = trained
    asked = fs[::3]  # 12 facts, every relation
    store = FactStore.from_facts(d / "facts.db", fs)
    hook = LookupHook(store, tok)
    before = _ask(model, tok, asked, hook)
    right = [f for f in asked if before[f].strip().startswith(f.value)]
    assert len(right) >= 10, before  # the model wrote the call; the store gave the value
    assert {(c.entity, c.relation) for c in hook.calls} >= {(f.entity, f.relation) for f in right}
    # edit every asked fact in the store: same weights, new answers
    new = {f: next(v for v in RELATIONS[f.relation] if v != f.value) for f in asked}
    store.put_many(Fact(f.entity, f.relation, v) for f, v in new.items())
    after = _ask(model, tok, asked, LookupHook(store, tok))
    follows = [f for f in right if after[f].strip().startswith(new[f])]
    assert follows == right, after
    # and without the hook the model cannot know the values: it was never trained on them
    raw = _ask(model, tok, asked, None)
    assert sum(raw[f].strip().startswith(f.value) for f in asked) <= 3


def test_hook_contract_without_a_model(trained, tmp_path):
    _, tok, _, _ = trained
    store = FactStore.from_facts(tmp_path / "f.db", [Fact("Ada Byron", "birthplace", "Leeds")])
    hook = LookupHook(store, tok)
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    end = tok.token_to_id(END)
    text = call("ada byron", "birthplace", "X")
    upto_return = ids(text[: text.index(RETURN) + len(RETURN)])
    assert hook(ids("About Ada"), []) == [] and hook(upto_return[:-1], []) == []  # no <|db_return|> yet: nothing
    assert hook(upto_return[:3], upto_return[3:]) == ids(" Leeds") + [end]  # the call may span prompt and output
    unknown = call("Nobody", "birthplace", "X")
    assert hook(ids(unknown[: unknown.index(RETURN) + len(RETURN)]), []) == ids(" " + UNKNOWN) + [end]
    assert hook([tok.token_to_id(RETURN)], []) == [end]  # a return with no call before it: closed, no value


def test_forced_tokens_go_through_the_cache_like_a_prompt(trained):
    """Forcing k tokens then sampling == greedy generation from the prompt extended by those tokens,
    in generate() and in the engine (hooks are per request there)."""
    model, tok, _, _ = trained
    prompt, forced = tok.encode("About Ada Byron. Ada Byron").ids, tok.encode(" works as a baker").ids
    hook = lambda p, g: forced if len(g) == 0 else []  # noqa: E731 - force at the very start
    with_hook = generate(model, torch.tensor([prompt]), GREEDY, hook=hook)[0, len(prompt):].tolist()
    ref = generate(model, torch.tensor([prompt + forced]), SamplingConfig(max_new_tokens=20 - len(forced),
                                                                           temperature=0.0))[0, len(prompt):].tolist()
    assert with_hook == ref and with_hook[: len(forced)] == forced
    engine = Engine(model, max_batch=2)
    reqs = [engine.submit(Request(prompt, 20, hook=hook)), engine.submit(Request(prompt, 20))]
    engine.run()
    assert reqs[0].output == with_hook  # the engine forces the same way
    assert reqs[1].output == generate(model, torch.tensor([prompt]), GREEDY)[0, len(prompt):].tolist()  # hook per request


def test_server_answers_from_the_store(trained, tmp_path):
    model, tok, fs, _ = trained
    f = fs[0]
    store = FactStore.from_facts(tmp_path / "f.db", fs)
    store.put(f.entity, f.relation, "Atlantis")
    with TestClient(build_app(model, tok, "lmlm", max_batch=2, max_queue=2, lookup=LookupHook(store, tok))) as client:
        r = client.post("/v1/completions", json={"model": "lmlm", "prompt": question(f.entity, f.relation),
                                                 "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.startswith(" Atlantis") and "<|db_" not in text  # the call shown as its value
