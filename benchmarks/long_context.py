"""Context compression on a long-context retrieval task (issue #21): EHPC, REFORM, token merging vs
the sink + window (StreamingLLM) and random-token baselines, at KV budgets of 10 / 25 / 50%.

A tiny Haipai model (3 layers, d_model 64, 4 heads, 57-token
vocabulary) is trained by this script on the key -> value task of long_context_task.py (48- then
128/256-token contexts, 1750 steps) and cached in benchmarks/results/ (safetensors), so reruns skip the
training. Each method then answers questions at contexts of 1k / 2k / 4k tokens (--quick: 512 / 1k,
fewer questions) through `generate(..., compress=...)`: greedy, exact match of the value token.

    python benchmarks/long_context.py [--quick] [--json out.json] [--retrain]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from benchmarks.long_context_task import (  # noqa: E402
    HaipaiModel, eval_examples, load, model_config, save, train)
from haipai_lightning.compress.config import CompressConfig  # noqa: E402
from haipai_lightning.compress.evaluator import calibrate_heads  # noqa: E402
from haipai_lightning.compress.merge_tune import tune_ratios  # noqa: E402
from haipai_lightning.compress.reform import calibrate_embed_app  # noqa: E402
from haipai_lightning.decode.generate import generate  # noqa: E402
from haipai_lightning.decode.sampling import SamplingConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CKPT = str(RESULTS / "long_context_model")
MAX_LEN = 4096 + 8
# Training curriculum (each phase a fresh AdamW with warm-up + cosine decay): short contexts with few pairs
# first -- attention at init spreads over all T tokens, so the retrieval signal is ~1/T and at T=128 the
# loss sat at chance for 600 steps here -- then longer contexts with the evaluation's 8 pairs. Repeated
# random spans (loss on the copy) are mixed in for a dense induction signal. A vanilla 3-layer stack: the
# 2-unique-layer MoR (cycle, Nr=2) and other variants stayed at chance within this CPU budget.
SHAPE = dict(n_layers=3, n_recursions=1)
PHASES = [dict(steps=500, lengths=[48], batch=48, n_pairs=3, n_questions=3, lr=3e-3, repeat=0.5, seed=0),
          dict(steps=1000, lengths=[48], batch=48, n_pairs=3, n_questions=3, lr=3e-3, repeat=0.5, seed=5),
          dict(steps=250, lengths=[128, 256], batch=24, n_pairs=8, n_questions=8, lr=2e-3, repeat=0.25, seed=1)]
N_PAIRS = 8
METHODS = ["ehpc", "reform", "merge", "recent", "random"]
BUDGETS = [0.10, 0.25, 0.50]
COMMON = dict(sink=4, window=4, pool=5)  # window = the question "? k k k": its queries score


def get_model(retrain: bool, path: str = CKPT) -> tuple[HaipaiModel, dict]:
    cached = None if retrain else load(path, MAX_LEN)
    if cached is not None:
        return cached
    print(f"training the retrieval model: {SHAPE} {PHASES}", flush=True)
    torch.manual_seed(0)
    model = HaipaiModel(model_config(MAX_LEN, **SHAPE))
    t0 = time.perf_counter()
    losses = []
    for ph in PHASES:
        ph = dict(ph)
        losses = train(model, ph.pop("steps"), ph.pop("lengths"), ph.pop("batch"), ph.pop("n_pairs"), **ph)
    meta = {**SHAPE, "phases": PHASES, "steps": sum(p["steps"] for p in PHASES),
            "train_seconds": time.perf_counter() - t0, "final_loss": sum(losses[-50:]) / 50}
    RESULTS.mkdir(exist_ok=True)
    save(model, path, meta)
    return model, meta


def run(model: HaipaiModel, ids: torch.Tensor, ans: torch.Tensor, cc: CompressConfig | None, batch: int) -> dict:
    """Accuracy (both digits right), mean prefill seconds and KV bytes per question, kept fraction."""
    s = SamplingConfig(max_new_tokens=1, temperature=0.0)
    right, secs, kv, frac = 0, 0.0, 0, 0.0
    for i in range(0, ids.size(0), batch):
        x = ids[i : i + batch]
        recs: list = []
        if cc is None:
            cc_full = CompressConfig(method="recent", budget=1.0)  # budget 1: the plain cached prefill, timed alike
            out = generate(model, x, s, compress=cc_full, records=recs)
        else:
            out = generate(model, x, s, compress=cc, records=recs)
        right += int((out[:, -1:] == ans[i : i + batch]).all(1).sum())
        secs += recs[0].prefill_seconds
        kv += recs[0].kv_bytes
        frac += recs[0].kept_fraction * x.size(0)
    n = ids.size(0)
    return {"acc": right / n, "prefill_ms": 1000 * secs / n, "kv_kib": kv / n / 1024, "kept": frac / n}


def judge(at: dict) -> tuple[str, bool]:
    """(best method at 25%, goal met?). The goal needs a model that retrieves: full-context accuracy >= 0.9
    (else every comparison is between guesses), then the best method >= 0.9x of it and above both baselines."""
    full_acc = at[("full", 1.0)]["acc"]
    best = max(("ehpc", "reform", "merge"), key=lambda m: at[(m, 0.25)]["acc"])
    acc = at[(best, 0.25)]["acc"]
    goal = (full_acc >= 0.9 and acc >= 0.9 * full_acc and acc > at[("recent", 0.25)]["acc"]
            and acc > at[("random", 0.25)]["acc"])
    return best, goal


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--retrain", action="store_true", help="train the model again (else the cached one)")
    p.add_argument("--model", default=CKPT, help="path prefix of the cached model (.safetensors + .json)")
    args = p.parse_args()
    torch.manual_seed(0)
    contexts = [512, 1024] if args.quick else [1024, 2048, 4096]
    n_eval, batch = (16, 8) if args.quick else (32, 8)
    model, meta = get_model(args.retrain, args.model)
    model.eval()
    # calibration (its own seed): EHPC's evaluator heads, REFORM's embedding layer, the merge ratios per budget
    cal_T = contexts[0]
    cal_ids, cal_ans, cal_needle = eval_examples(8, cal_T, N_PAIRS, seed=999)
    base = CompressConfig(**COMMON, evaluator_apps=2)
    heads, _ = calibrate_heads(model, cal_ids, cal_needle, base, n_heads=2)
    embed_app = calibrate_embed_app(model, cal_ids, cal_needle, CompressConfig(method="reform", budget=0.1, **COMMON))
    ratios = {}
    t0 = time.perf_counter()
    for b in BUDGETS:
        ratios[b] = tune_ratios(model, cal_ids[:4], cal_ans[:4, 0], CompressConfig(method="merge", budget=b, **COMMON),
                                n_trials=8 if args.quick else 20).ratios
    tune_s = time.perf_counter() - t0
    print(f"evaluator heads {heads}, REFORM embed_app {embed_app}, merge ratios tuned in {tune_s:.0f} s", flush=True)

    def config(method: str, b: float) -> CompressConfig:
        return CompressConfig(method=method, budget=b, heads=heads, evaluator_apps=2, embed_app=embed_app,
                              chunk=256, merge_ratios=ratios[b] if method == "merge" else None, **COMMON)

    rows = []
    for T in contexts:
        ids, ans, _ = eval_examples(n_eval, T, N_PAIRS, seed=T)
        full = run(model, ids, ans, None, batch)
        rows.append({"context": T, "method": "full", "budget": 1.0, **full, "speedup": 1.0})
        for m in METHODS:
            for b in BUDGETS:
                r = run(model, ids, ans, config(m, b), batch)
                rows.append({"context": T, "method": m, "budget": b, **r, "speedup": full["prefill_ms"] / r["prefill_ms"]})
        print(table([r for r in rows if r["context"] == T],
                    ["context", "method", "budget", "acc", "kept", "prefill_ms", "speedup", "kv_kib"]), flush=True)
    top = contexts[-1]
    at = {(r["method"], r["budget"]): r for r in rows if r["context"] == top}
    full_acc = at[("full", 1.0)]["acc"]
    headline = {"full_acc": full_acc, **{f"{m}_acc_at_25pct": at[(m, 0.25)]["acc"] for m in METHODS},
                "best_prefill_speedup_at_25pct": max(at[(m, 0.25)]["speedup"] for m in ("ehpc", "reform", "merge")),
                "merge_kept_fraction_at_25pct": at[("merge", 0.25)]["kept"], "context": top}
    best, goal = judge(at)
    headline["goal_met"] = float(goal)
    print(f"\nbest method at 25%: {best}, {at[(best, 0.25)]['acc']:.3f} vs full {full_acc:.3f} "
          f"({at[(best, 0.25)]['acc'] / full_acc if full_acc else float('nan'):.2f}x of it; goal (full >= 0.9, best >= "
          f"0.9x of it and above both baselines): "
          f"{'met' if goal else 'NOT met'})")
    print("headline:", {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, model=meta, heads=heads, embed_app=embed_app,
               merge_ratios={str(k): v for k, v in ratios.items()}, contexts=contexts, questions=n_eval,
               quick=args.quick)


if __name__ == "__main__":
    main()
