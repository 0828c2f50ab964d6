"""Evaluation: perplexity by hand, the lm_eval adapter's scores, a local task end to end, `haipai eval`."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.corpus import load_documents
from datamodules.tokenizer import eos_id, train_tokenizer
from haipai_lightning.config import ModelConfig
from haipai_lightning.eval.perplexity import perplexity, token_nll
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

# lm-evaluation-harness is the `eval` extra (in `dev` too); the perplexity tests do not need it
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install -e .[eval]")

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(load_documents("kjv")[:40], 400)


def tiny_model(vocab: int, seed: int = 0) -> HaipaiModel:
    # MoR expert-choice Nr=3: at eval its routing is causal (threshold), so batching/padding must not matter
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=64, n_recursions=3, sharing="middle_cycle")
    m = HaipaiModel(cfg, router=ExpertChoiceRouter)
    with torch.no_grad():  # random routers would send nobody past step 1 half the time; spread the logits
        for p in m.router.parameters():
            p.normal_(0, 1.0)
    return m.eval()


def test_perplexity_is_exp_of_the_mean_token_nll_by_hand(tok):
    model = tiny_model(tok.get_vocab_size())
    ids = torch.tensor(tok.encode(TEXT).ids)  # ~25 tokens
    L = 8  # several blocks and a short tail
    # by hand: one forward per predicted token on exactly its context (the block so far)
    nlls = []
    with torch.no_grad():
        for t in range(1, ids.numel()):
            start = (t - 1) // L * L
            logits = model(ids[None, start:t]).logits[0, -1]
            nlls.append(-float(F.log_softmax(logits.double(), -1)[ids[t]]))
    res = perplexity(model, ids, L, batch_size=2, n_bytes=len(TEXT.encode()))
    assert res.tokens == ids.numel() - 1
    assert res.nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(sum(nlls) / math.log(2) / len(TEXT.encode()), rel=1e-5)
    # a uniform model's perplexity is the vocabulary size
    uniform = tiny_model(tok.get_vocab_size())
    with torch.no_grad():
        uniform.head.weight.zero_()
    assert perplexity(uniform, ids, L).ppl == pytest.approx(tok.get_vocab_size(), rel=1e-4)


def test_token_nll_batches_equal_single_blocks(tok):
    model = tiny_model(tok.get_vocab_size())
    ids = torch.tensor(tok.encode(TEXT * 3).ids)
    assert torch.allclose(token_nll(model, ids, 16, batch_size=1), token_nll(model, ids, 16, batch_size=4), atol=1e-5)


def _instance(args, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@needs_lm_eval
def test_adapter_loglikelihood_matches_the_models_own_scoring(tok):
    from haipai_lightning.eval.lm_eval_adapter import HaipaiLM

    model = tiny_model(tok.get_vocab_size())
    lm = HaipaiLM(model=model, tokenizer=tok, batch_size=3)
    pairs = [("In the beginning God", " created the heaven"), ("And the earth was", " without form"),
             ("And God said,", " Let there be light: and there was light."), ("", "Amen."),
             ("Jesus wept", ".")]
    got = lm.loglikelihood([_instance(p) for p in pairs])
    eos = eos_id(tok)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c = tok.encode(ctx).ids if ctx else [eos]
        w = tok.encode(ctx + cont).ids if ctx else [eos] + tok.encode(cont).ids
        n = len(w) - len(c)
        with torch.no_grad():  # the model's own scoring: one unpadded sequence, sum of log-softmax
            logp = F.log_softmax(model(torch.tensor([w[:-1]])).logits[0].double(), -1)
        tgt = torch.tensor(w[-n:])
        own = logp[-n:].gather(1, tgt[:, None]).sum()
        assert lp == pytest.approx(float(own), abs=1e-4)
        assert greedy == bool((logp[-n:].argmax(-1) == tgt).all())
    # rolling log-likelihood of a text = -(its token NLLs) given <|endoftext|>, windows of max_length
    lm_short = HaipaiLM(model=model, tokenizer=tok, max_length=8)
    text = TEXT
    ids = torch.tensor([eos] + tok.encode(text).ids)
    [rolling] = lm_short.loglikelihood_rolling([_instance((text,), "loglikelihood_rolling")])
    # get_rolling_token_windows keeps full windows of 8; with the same 8-token windows by hand:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids[1:].tolist(), eos, 8, 1)):
        w = ctx + cont
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([w[:-1]])).logits[0].double(), -1)
        total += float(logp[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum())
    assert rolling == pytest.approx(total, abs=1e-4)
    assert rolling < 0


@needs_lm_eval
def test_generate_until_stops_at_the_stop_string(tok):
    from haipai_lightning.decode.sampling import SamplingConfig
    from haipai_lightning.decode.generate import generate
    from haipai_lightning.eval.lm_eval_adapter import HaipaiLM

    model = tiny_model(tok.get_vocab_size())
    lm = HaipaiLM(model=model, tokenizer=tok)
    [free] = lm.generate_until([_instance(("And God said", {"until": ["\n\n\n"], "max_gen_toks": 12}),
                                          "generate_until")])
    ctx = tok.encode("And God said").ids
    ref = generate(model, torch.tensor([ctx]), SamplingConfig(12, temperature=0.0))[0, len(ctx):].tolist()
    eos = eos_id(tok)
    ref = ref[: ref.index(eos)] if eos in ref else ref
    assert free == tok.decode(ref)  # greedy, cached: the same tokens as haipai's own generate
    if len(free) > 2:
        stop = free[1:3]  # cut at an inner stop string
        [cut] = lm.generate_until([_instance(("And God said", {"until": [stop], "max_gen_toks": 12}),
                                             "generate_until")])
        assert cut == free.split(stop)[0]


@needs_lm_eval
def test_local_multiple_choice_task_runs_through_lm_eval(tok):
    from haipai_lightning.eval.lm_eval_adapter import TASKS_DIR, HaipaiLM, run_lm_eval

    model = tiny_model(tok.get_vocab_size())
    lm = HaipaiLM(model=model, tokenizer=tok, batch_size=8)
    results = run_lm_eval(lm, ["haipai_kjv_cloze"], num_fewshot=0, limit=12, bootstrap_iters=0)
    acc = results["haipai_kjv_cloze"]["acc,none"]
    # the accuracy lm_eval reports is argmax over the choices' log-likelihoods, recomputed here
    rows = [json.loads(line) for line in (TASKS_DIR / "haipai_kjv_cloze" / "kjv_cloze.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows[:12]:
        scores = [lp for lp, _ in lm.loglikelihood([_instance((row["context"], c)) for c in row["choices"]])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    assert acc == pytest.approx(correct / 12)
    assert 0.0 <= results["haipai_kjv_cloze"]["acc_norm,none"] <= 1.0


@needs_lm_eval
def test_haipai_eval_command_end_to_end(tok, tmp_path, capsys):
    from haipai_lightning.cli.main import main
    from haipai_lightning.train.module import MoRLightningModule

    model = tiny_model(tok.get_vocab_size())
    module = MoRLightningModule(config=model.cfg, router=ExpertChoiceRouter)
    module.model.load_state_dict(model.state_dict())
    module.tokenizer_json = tok.to_str()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "eval.json"
    main(["eval", "--ckpt_path", str(path), "--data", str(text), "--seq_len", "16", "--tasks", "haipai_kjv_cloze",
          "--limit", "4", "--decode_tokens", "8", "--json", str(out)])
    rep = json.loads(out.read_text())
    ids = torch.tensor([t for d in [TEXT * 4] for t in (*tok.encode(d).ids, eos_id(tok))])
    assert rep["perplexity"]["tokens"] == ids.numel() - 1
    assert rep["perplexity"]["ppl"] == pytest.approx(perplexity(model, ids, 16).ppl, rel=1e-5)
    assert 0.0 <= rep["lm_eval"]["haipai_kjv_cloze"]["acc,none"] <= 1.0
    eff = rep["efficiency"]
    n = model.num_parameters()
    assert (eff["unique_params"], eff["effective_params"]) == (n["unique"], n["effective"])
    assert eff["effective_params"] > eff["unique_params"]  # Nr=3 shares the middle layers
    assert eff["decode_tokens_per_s"] > 0 and eff["peak_memory_bytes"] > 0
    # MoR caches only what each step's tokens left: at most the vanilla cache, and at least step 1's share
    assert 0 < eff["kv_cache_bytes"] <= eff["kv_cache_bytes_vanilla"]
    assert eff["kv_ratio"] >= 2 / 5 - 1e-9  # prelude and coda (2 of the 5 applications) cache every token
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "KV ratio" in printed and "haipai_kjv_cloze acc,none" in printed


def test_efficiency_flops_match_the_flop_counter(tok):
    from haipai_lightning.analysis.efficiency import efficiency_report
    from haipai_lightning.analysis.flops import training_flops

    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=4, n_heads=4, ffn_hidden=64,
                      max_seq_len=32, n_recursions=1)
    m = HaipaiModel(cfg).eval()
    rep = efficiency_report(m, seq_len=16, batch=2, new_tokens=4)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    assert rep.train_flops_per_token == pytest.approx(training_flops(m, m(x).records, 2, 16) / 32)
    # vanilla model: its cache is the vanilla cache, (prompt + new) tokens in each of 4 layers
    assert rep.kv_cache_bytes == rep.kv_cache_bytes_vanilla == 4 * 2 * 4 * 8 * 4 * (rep.prompt_tokens + rep.new_tokens)
    assert rep.kv_ratio == 1.0
