"""Post-training quantization: perplexity, size on disk and CPU decode speed per method.

Two models trained here briefly on the default corpus (King James Bible, BPE 4096, blocks of
128): the quickstart shape (d=192, 5 layers, Nr=3 expert-choice, middle-cycle) and a larger
CPU-scale one (d=384, 8 layers, 6 heads of 64, Nr=3). Each is then quantized by every method of
haipai_lightning.quant.methods.METHODS and evaluated on the same validation blocks: perplexity
before / after, model.safetensors size before / after, greedy batch-1 decode tokens/s before /
after (haipai_lightning/quant_report.py).

Calibrated methods (issue #22) are calibrated on training batches (never the validation blocks):
int4 / int3 round-to-nearest vs GPTQ (arXiv 2210.17323) vs GuidedQuant (arXiv 2505.07004), and
W4A4KV4 with QuaRot's random Hadamard vs SpinQuant's learned rotation (arXiv 2405.16406). Goals
(printed and stored under "goals"): GPTQ < RTN and GuidedQuant <= GPTQ at 3 bits, learned <= random
rotation. `--quick`: one smaller model (d=96, 5 layers, 40 steps, sequences of 64), 2 validation
batches, the issue's methods only, 8 decode tokens once: about a minute on 2 cores.

    python benchmarks/quantization.py [--quick] [--json out.json] [--threads 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import alternate, forever, parser, table, write_json  # noqa: E402
from haipai_lightning.decode.static import StaticDecoder  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.eval.quant_report import COLUMNS, evaluate_methods  # noqa: E402
from haipai_lightning.quant.methods import METHODS  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

SHAPES = {
    "quickstart": dict(d_model=192, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=512),
    "larger": dict(d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_hidden=1024),
}
QUICK_SHAPES = {"quick": dict(d_model=96, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=192)}
QUICK_METHODS = ["int4", "int4_gptq", "int3_rtn", "int3_gptq", "int3_guided", "int3_lnq", "w4a4kv4", "w4a4kv4_spinquant"]
HEADLINE = {"int8": "int8", "int4": "int4", "int4_rotated": "int4_rotated", "w4a4": "w4a4",
            "w4a4_rotated": "w4a4_rotated", "w4a4kv4": "w4a4kv4", "int4_gptq": "int4_gptq",
            "int4_guided": "int4_guided", "int3_rtn": "int3_rtn", "int3_gptq": "int3_gptq",
            "int3_guided": "int3_guided", "int3_lnq": "int3_lnq", "w4a4kv4_hadamard": "w4a4kv4", "w4a4kv4_spinquant": "w4a4kv4_spinquant"}


def goals(h: dict, prefix: str = "") -> dict[str, bool]:
    g = lambda k: h.get(f"{prefix}ppl_{k}")  # noqa: E731
    out = {}
    if g("int3_gptq") is not None and g("int3_rtn") is not None:
        out[f"{prefix}gptq_lt_rtn_int3"] = g("int3_gptq") < g("int3_rtn")
    if g("int3_guided") is not None and g("int3_gptq") is not None:
        out[f"{prefix}guided_le_gptq_int3"] = g("int3_guided") <= g("int3_gptq")
    if g("w4a4kv4_spinquant") is not None and g("w4a4kv4_hadamard") is not None:
        out[f"{prefix}spinquant_le_hadamard"] = g("w4a4kv4_spinquant") <= g("w4a4kv4_hadamard")
    return out


def train(model: HaipaiModel, dm: TextDataModule, steps: int, lr: float = 3e-3) -> float:
    """AdamW, linear warm-up, constant, linear decay over the last 30%; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 30, 1.0, max(0.1, (steps - s) / (0.3 * steps))))
    model.train()
    it, t0 = forever(dm), time.perf_counter()
    for _, b in zip(range(steps), it):
        out = model(b["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten()) + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def static_decode_speed(shape: dict, V: int, new: int, reps: int) -> dict:
    """Batch-1 greedy decode tokens/s of a dense stack of `shape` through StaticDecoder (decode/static.py):
    fp32 weights vs int8 weights (fbgemm's dynamic-quantized linear), timed in alternation.

    The trained models above are MoR (routed), which decode through the general path, where Python and
    dispatch, not weight bytes, set the pace (8-bit weights cannot show there); the static path is
    where batch-1 decoding approaches the memory bound, so that is where 8-bit weights are measured.
    Speed does not depend on training: an initialised dense model of the same shape."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, max_seq_len=16 + new, n_recursions=1, **shape)
    dense = HaipaiModel(cfg).eval()
    prompt = torch.randint(0, V, (1, 16))
    decs = {w: StaticDecoder(dense, 1, 16 + new, weights=w) for w in ("fp32", "int8")}
    tokens: dict[str, torch.Tensor] = {}

    def run(w: str):
        def go() -> None:
            dec, out = decs[w], []
            nxt = dec.prefill(prompt).argmax(-1, keepdim=True)
            for _ in range(new - 1):
                out.append(nxt)
                nxt = dec.step(nxt).argmax(-1, keepdim=True)
            tokens[w] = torch.cat(out + [nxt], 1)
        return go

    secs = alternate({w: run(w) for w in decs}, reps)
    tps = {w: new / secs[w] for w in decs}
    return {"tok_s_fp32": tps["fp32"], "tok_s_int8": tps["int8"], "speedup_int8": tps["int8"] / tps["fp32"],
            "greedy_agreement_int8": float((tokens["int8"] == tokens["fp32"]).float().mean())}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="training steps of the models")
    p.add_argument("--val_batches", type=int, default=None, help="validation batches of 16 blocks")
    p.add_argument("--calib_batches", type=int, default=None, help="training batches the calibrated methods use")
    args = p.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    seq = 64 if args.quick else 128
    steps = args.steps or ([200] if args.quick else [200, 100])  # quick: 200 steps, enough for the methods to differ
    val_n = args.val_batches or (2 if args.quick else 10)
    calib_n = args.calib_batches or (2 if args.quick else 4)
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=16, vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    val = [b for _, b in zip(range(val_n), dm.val_dataloader())]
    methods = QUICK_METHODS if args.quick else [m for m in METHODS if m != "fp32"]
    new_tokens, reps = (8, 1) if args.quick else (32, 3)
    rows, headline, info = [], {}, {}
    t_start = time.perf_counter()
    for (name, shape), n in zip(shapes.items(), steps):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, max_seq_len=seq, n_recursions=3, sharing="middle_cycle", **shape)
        model = HaipaiModel(cfg, router=ExpertChoiceRouter)
        secs = train(model, dm, n)
        it = iter(dm.train_dataloader())
        calib = [{k: v[:8] for k, v in next(it).items()} for _ in range(calib_n)]  # training text, 8 blocks each
        params = model.num_parameters()["unique"]
        print(f"{name}: {params / 1e6:.2f}M unique parameters, trained {n} steps in {secs:.0f} s", flush=True)
        t0 = time.perf_counter()
        reports = evaluate_methods(model.eval(), methods, val, new_tokens=new_tokens, reps=reps, calib=calib)
        info[name] = {"unique_params": params, "train_steps": n, "train_s": secs,
                      "quantize_and_eval_s": time.perf_counter() - t0}
        for r in reports:
            rows.append({"model": name, **r.as_row()})
        prefix = "" if name in ("quickstart", "quick") else f"{name}_"
        by = {r.method: r for r in reports}
        headline[f"{prefix}ppl_fp32"] = reports[0].ppl_before
        for key, m in HEADLINE.items():
            if m in by:
                headline[f"{prefix}ppl_{key}"] = by[m].ppl_after
        print(table([{"model": name, **r.as_row()} for r in reports], ["model", *COLUMNS]), flush=True)
        # written after each model, so a long run that is stopped keeps what it measured
        write_json(args.json, headline, rows=rows, models=info, val_blocks=val_n * 16, steps=steps,
                   goals=goals(headline, prefix))
    # decode speed at batch 1 (issue #17): the best quantized method over fp32, through either decode path
    fast = static_decode_speed(shapes[list(shapes)[-1]], 4096, 16 if args.quick else 48, 1 if args.quick else 3)
    general = {r["method"]: r["decode_tok_s_after"] / r["decode_tok_s_before"] for r in rows}
    best = max([("int8 (fbgemm, static decode path)", fast["speedup_int8"])] +
               [(f"{k} (general path)", v) for k, v in general.items()], key=lambda kv: kv[1])
    headline["decode_speedup_best_quantized_batch1"] = best[1]
    print(f"batch-1 decode, dense {list(shapes)[-1]} shape, static path: fp32 {fast['tok_s_fp32']:.1f} tok/s, int8 "
          f"{fast['tok_s_int8']:.1f} tok/s ({fast['speedup_int8']:.2f}x, greedy tokens agree "
          f"{fast['greedy_agreement_int8']:.0%}); best quantized over fp32: {best[0]} {best[1]:.2f}x", flush=True)
    info["static_decode_batch1"] = {**fast, "best_method": best[0]}
    all_goals = {k: v for name in shapes for k, v in
                 goals(headline, "" if name in ("quickstart", "quick") else f"{name}_").items()}
    all_goals["decode_speedup_best_quantized_batch1_ge_1.5"] = best[1] >= 1.5
    write_json(args.json, headline, rows=rows, models=info, val_blocks=val_n * 16, steps=steps, goals=all_goals,
               total_s=time.perf_counter() - t_start)
    print(table(rows, ["model", *COLUMNS]))
    print("headline:", {k: round(v, 3) for k, v in headline.items()})
    print("goals:", all_goals)


if __name__ == "__main__":
    main()
