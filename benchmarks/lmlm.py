"""LMLM (arXiv 2505.15962) vs a plain model: fact accuracy on synthetic biographies, and after editing the store.

A corpus of made-up people (datamodules/biographies.py: birthplace, occupation, employer each) is
written twice: annotated with lookup calls (LMLM; the returned values masked out of the loss,
data.lmlm=true) and rendered as plain text (the baseline). Both models have the same shape and the
same tokenizer (the LMLM one, so the vocabulary is identical), and train for the same steps on the
same biographies. A fact is asked as "About <name>. <name> was born in" and counts as right when
the greedy continuation, as a reader sees it, starts with the value: the LMLM model must write the
call and the lookup hook (haipai_lightning/decode/lookup.py) inserts the value from the SQLite
store; the plain model must have memorised it. Then 50% of the store's facts are changed to another
value and asked again: the LMLM model should say the new value; the plain model cannot.

    python benchmarks/lmlm.py [--quick] [--json out.json] [--steps N] [--people N]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from datamodules.biographies import RELATIONS, corpus, question  # noqa: E402
from datamodules.lmlm import Fact, render  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.decode.generate import generate  # noqa: E402
from haipai_lightning.decode.lookup import FactStore, LookupHook, readable  # noqa: E402
from haipai_lightning.decode.sampling import SamplingConfig  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402


def train(dm: TextDataModule, cfg: ModelConfig, steps: int, seed: int = 0) -> tuple[HaipaiModel, float]:
    """AdamW on the data module's batches (labels -100 = not in the loss); returns (model, seconds)."""
    torch.manual_seed(seed)
    model = HaipaiModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    t0, done = time.perf_counter(), 0
    model.train()
    while done < steps:
        for b in dm.train_dataloader():
            loss = F.cross_entropy(model(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return model.eval(), time.perf_counter() - t0


def answers(model: HaipaiModel, tok, prompts: list[str], hook=None, new_tokens: int = 24) -> list[str]:
    """Greedy continuations as a reader sees them; prompts batched by token length."""
    ids = [tok.encode(p).ids for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    for n, group in by_len.items():
        x = torch.tensor([ids[i] for i in group])
        y = generate(model, x, SamplingConfig(max_new_tokens=new_tokens, temperature=0.0), hook=hook)
        for i, row in zip(group, y[:, n:].tolist()):
            out[i] = readable(tok, row)
    return out


def accuracy(texts: list[str], values: list[str]) -> float:
    return sum(t.strip().startswith(v) for t, v in zip(texts, values)) / max(len(values), 1)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--people", type=int, default=None)
    args = p.parse_args()
    n_people = args.people or (60 if args.quick else 200)
    steps = args.steps or (200 if args.quick else 1200)
    d, seq, batch = (64, 64, 16) if args.quick else (128, 96, 16)
    work = Path(tempfile.mkdtemp(prefix="haipai-lmlm-"))
    docs, facts = corpus(n_people, copies=4, seed=0)
    (work / "annotated.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (work / "plain.jsonl").write_text("".join(json.dumps({"text": render(t)}) + "\n" for t in docs))
    common = dict(seq_len=seq, batch_size=batch, val_fraction=0.02, cache_dir=str(work / "cache"), seed=0)
    dm_lmlm = TextDataModule(source=str(work / "annotated.jsonl"), vocab_size=512, lmlm=True, **common)
    dm_lmlm.setup()
    tok_path = dm_lmlm.cache_path / "tokenizer.json"
    dm_plain = TextDataModule(source=str(work / "plain.jsonl"), tokenizer_path=str(tok_path), **common)
    dm_plain.setup()
    tok = dm_lmlm.tokenizer
    cfg = ModelConfig(vocab_size=dm_lmlm.vocab_size_actual, d_model=d, n_layers=4, n_heads=4, n_kv_heads=2,
                      ffn_hidden=int(8 * d / 3), max_seq_len=seq + 32, n_recursions=1, sharing="cycle")
    models, seconds = {}, {}
    for name, dm in (("lmlm", dm_lmlm), ("plain", dm_plain)):
        models[name], seconds[name] = train(dm, cfg, steps)
        print(f"trained {name}: {steps} steps in {seconds[name]:.1f} s", flush=True)

    store = FactStore.from_facts(work / "facts.db", facts)
    hook = LookupHook(store, tok)
    prompts = [question(f.entity, f.relation) for f in facts]
    values = [f.value for f in facts]
    lmlm_out = answers(models["lmlm"], tok, prompts, hook)
    plain_out = answers(models["plain"], tok, prompts)
    called = sum(c.entity == f.entity and c.relation == f.relation for c, f in zip(hook.calls, facts)) / len(facts)

    # edit half the store: another value of the same relation
    rng = random.Random(1)
    edited = rng.sample(range(len(facts)), len(facts) // 2)
    new = {i: rng.choice([v for v in RELATIONS[facts[i].relation] if v != facts[i].value]) for i in edited}
    store.put_many(Fact(facts[i].entity, facts[i].relation, v) for i, v in new.items())
    e_prompts, e_values = [prompts[i] for i in edited], [new[i] for i in edited]
    lmlm_edit = answers(models["lmlm"], tok, e_prompts, LookupHook(store, tok))
    plain_edit = [plain_out[i] for i in edited]  # the plain model's weights did not change: same answers

    n_params = sum(p.numel() for p in models["lmlm"].parameters())
    rows = [
        {"model": "LMLM + store", "params": n_params, "fact acc": accuracy(lmlm_out, values),
         "acc after 50% edit (new value)": accuracy(lmlm_edit, e_values), "train s": seconds["lmlm"]},
        {"model": "plain", "params": n_params, "fact acc": accuracy(plain_out, values),
         "acc after 50% edit (new value)": accuracy(plain_edit, e_values), "train s": seconds["plain"]},
    ]
    print(f"\n{n_people} people x 3 facts, 4 biographies each; {steps} steps of batch {batch}x{seq}, d={d}, 4 layers; "
          f"{len(edited)} facts edited. LMLM wrote the right call for {called:.3f} of the facts.")
    print(table(rows, ["model", "params", "fact acc", "acc after 50% edit (new value)", "train s"]))
    for i in range(3):
        print(f"  {prompts[i]!r} -> lmlm {lmlm_out[i][:40]!r} | plain {plain_out[i][:40]!r} (store: {values[i]})")
    headline = {"lmlm_fact_acc": rows[0]["fact acc"], "plain_fact_acc": rows[1]["fact acc"],
                "lmlm_fact_acc_after_edit": rows[0]["acc after 50% edit (new value)"]}
    headline["lmlm_vs_plain"] = headline["lmlm_fact_acc"] / max(headline["plain_fact_acc"], 1e-9)
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    print(f"goal: lmlm >= plain ({headline['lmlm_fact_acc']:.3f} vs {headline['plain_fact_acc']:.3f}); after the edit "
          f"{headline['lmlm_fact_acc_after_edit']:.3f} of the edited facts follow the store (goal >= 0.9)")
    write_json(args.json, headline, rows=rows, call_acc=called, people=n_people, steps=steps,
               plain_after_edit_new_value=rows[1]["acc after 50% edit (new value)"])


if __name__ == "__main__":
    main()
