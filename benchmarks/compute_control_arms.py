"""Compute control, two arms of benchmarks/compute_control.py (issue 20, items 2 and 4):

acm_arm:          Adaptive Computation Modules (arXiv 2312.10193) against the dense MLP at equal training steps.
                  Dense: S steps. ACM: S/2 dense steps, then ACMization (each MLP split into N learners) and
                  the paper's phases: S/16 distillation, S/16 gate pre-training, 3S/8 end to end (budget 0.5).
                  Rows: validation loss and mean active learners of the gated ACM, and the same model with
                  every token forced to k = 1..N learners (the quality / compute curve the gate chooses on).
token_budget_arm: TALE-style budget-aware generation. A model trained on (prompt, <|budget_L|>, continuation,
                  end) examples from KJV (datamodules/token_budget.py) continues held-out prompts through the
                  engine with `token_budget` N; the figure is the median |generated length - N| / N (goal
                  <= 0.25). Peer: the same model given one fixed budget token whatever N is asked (what a model
                  that ignores the request would score).

    python benchmarks/compute_control_arms.py [--quick] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import forever, parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.decode.engine import Engine, Request  # noqa: E402
from haipai_lightning.decode.token_budget import budget_tokens, nearest_budget  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.train.acm import acm_modules, acmize, train_acm_phases  # noqa: E402

CACHE = os.environ.get("HAIPAI_BENCH_CACHE", ".haipai_cache")


def _cfg(vocab: int, seq: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=96, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                       max_seq_len=seq, n_recursions=1, sharing="cycle")


def _train(model: HaipaiModel, batches, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    # linear decay to 10% (annealing sharpens what a short run learnt, e.g. where the end token goes)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(steps, 1))
    model.train()
    for _ in range(steps):
        b = next(batches)
        out = model(b["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        (loss + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        opt.step()
        sched.step()


@torch.no_grad()
def _val(model: HaipaiModel, batches: list) -> tuple[float, float | None]:
    """(mean validation loss, mean active learners over the ACM records or None)."""
    model.eval()
    losses, ks = [], []
    for b in batches:
        out = model(b["input_ids"])
        losses.append(float(F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)))
        ks += [float(r.metrics["mean_active_blocks"]) for r in out.records if r.group == "acm"]
    return statistics.mean(losses), (statistics.mean(ks) if ks else None)


def acm_arm(args) -> tuple[list[dict], dict]:
    from datamodules import TextDataModule

    steps, n_val, seq = (160, 4, 64) if args.quick else (1200, 16, 128)
    N = 4
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=16, vocab_size=1024,
                        max_documents=300 if args.quick else None, cache_dir=CACHE)
    dm.prepare_data()
    dm.setup("fit")
    val = [b for _, b in zip(range(n_val), dm.val_dataloader())]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dense = HaipaiModel(_cfg(1024, seq))
    it = forever(dm)
    _train(dense, it, steps // 2)
    half = HaipaiModel(_cfg(1024, seq))
    half.load_state_dict(dense.state_dict())
    _train(dense, it, steps - steps // 2)  # the dense arm: S steps in all
    it = forever(dm)  # the ACM arm sees the same batches from its own stream
    for _ in range(steps // 2):
        next(it)
    calib = next(forever(dm))["input_ids"]
    acm = acmize(half, calibration_ids=calib, n_learners=N, budget=0.5, budget_loss_weight=1.0)
    short = steps // 16  # distillation and gate pre-training do not train the LM: keep them short
    train_acm_phases(acm, it, short, short, steps - steps // 2 - 2 * short, final_lr_fraction=0.1)
    dense_loss, _ = _val(dense, val)
    acm_loss, acm_k = _val(acm, val)
    rows = [{"model": "dense SwiGLU", "steps": steps, "val_loss": dense_loss, "active_learners": float(N),
             "active_fraction": 1.0},
            {"model": "ACM, gated", "steps": steps, "val_loss": acm_loss, "active_learners": acm_k,
             "active_fraction": acm_k / N}]
    for k in range(1, N + 1):
        for m in acm_modules(acm):
            m.forced_k = k
        loss, _ = _val(acm, val)
        rows.append({"model": f"ACM, every token k={k}", "steps": steps, "val_loss": loss, "active_learners": float(k),
                     "active_fraction": k / N})
    for m in acm_modules(acm):
        m.forced_k = None
    headline = {"acm_val_loss_delta": acm_loss - dense_loss, "acm_mean_active_blocks": acm_k,
                "acm_active_fraction": acm_k / N, "acm_seconds": time.perf_counter() - t0}
    return rows, headline


def _continue(model: HaipaiModel, prompts: list[list[int]], budgets: list[int], eos: int, table: dict[int, int],
              max_new: int) -> list[int]:
    """Generated continuation lengths (tokens before the end token, or all of them when cut at max_new)."""
    engine = Engine(model, max_batch=8, max_len=model.cfg.max_seq_len, budget_tokens=table)
    reqs = [engine.submit(Request(p, max_new, eos_id=eos, token_budget=n)) for p, n in zip(prompts, budgets)]
    engine.run()
    return [len(r.output) - (r.finish_reason == "stop") for r in reqs]


def token_budget_arm(args) -> tuple[list[dict], dict]:
    from datamodules.token_budget import TokenBudgetDataModule

    steps, n_prompts, seq = (400, 24, 80) if args.quick else (2000, 96, 128)
    dm = TokenBudgetDataModule(source="kjv", seq_len=seq, batch_size=16, vocab_size=1024, budget_min=4,
                               budget_max=32, prompt_min=4, prompt_max=24, max_documents=300 if args.quick else None,
                               cache_dir=CACHE)
    dm.prepare_data()
    dm.setup("fit")
    table_ = budget_tokens(dm.tokenizer)
    eos = dm.eos_token_id
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = HaipaiModel(_cfg(1024, seq))
    _train(model, forever(dm), steps)
    # held-out prompts: validation text the model never trained on, budgets off and on the trained ladder
    g = torch.Generator().manual_seed(1)
    tokens = dm.datasets["val"].tokens
    asked = [6, 9, 12, 16, 20, 24, 28, 32]
    prompts, budgets = [], []
    while len(prompts) < n_prompts:
        s = int(torch.randint(0, len(tokens) - 20, (1,), generator=g))
        p = [int(t) for t in tokens[s : s + 12]]
        if eos not in p:
            prompts.append(p)
            budgets.append(asked[len(budgets) % len(asked)])
    max_new = 2 * max(asked)
    rows, head = [], {}
    fixed = nearest_budget(table_, 16)
    for name, tab in [("budget token as asked", table_),
                      (f"fixed budget token ({fixed}) whatever is asked", {n: table_[fixed] for n in table_})]:
        lengths = _continue(model, prompts, budgets, eos, tab, max_new)
        rel = [abs(n - b) / b for n, b in zip(lengths, budgets)]
        stopped = sum(n < max_new for n in lengths) / len(lengths)
        rows.append({"generation": name, "prompts": len(prompts), "median_rel_error": statistics.median(rel),
                     "mean_rel_error": statistics.mean(rel), "ended_by_model": stopped})
        for b in asked if tab is table_ else []:
            sel = [n for n, bb in zip(lengths, budgets) if bb == b]
            rows.append({"generation": f"  asked {b}: lengths {sel}", "prompts": len(sel),
                         "median_rel_error": statistics.median([abs(n - b) / b for n in sel])})
    head = {"token_budget_rel_error": rows[0]["median_rel_error"],
            "token_budget_rel_error_fixed_token": rows[-1]["median_rel_error"],
            "token_budget_ended_by_model": rows[0]["ended_by_model"], "token_budget_seconds": time.perf_counter() - t0}
    return rows, head


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--arm", choices=["acm", "token_budget", "both"], default="both", help="run one arm or both")
    args = p.parse_args()
    headline, rest = {}, {}
    if args.arm in ("acm", "both"):
        rows, head = acm_arm(args)
        print(table(rows, ["model", "steps", "val_loss", "active_learners", "active_fraction"]))
        headline.update(head)
        rest["acm"] = rows
    if args.arm in ("token_budget", "both"):
        rows, head = token_budget_arm(args)
        print(table(rows, ["generation", "prompts", "median_rel_error", "mean_rel_error", "ended_by_model"]))
        headline.update(head)
        rest["token_budget"] = rows
        print(f"token_budget_rel_error {head['token_budget_rel_error']:.3f} against the goal <= 0.25")
    print({k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, **rest)


if __name__ == "__main__":
    main()
