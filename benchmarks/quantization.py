"""Post-training quantization: perplexity, size on disk and CPU decode speed per method.

Two models trained here briefly on the default corpus (King James Bible, BPE 4096, blocks of
128): the quickstart shape (d=192, 5 layers, Nr=3 expert-choice, middle-cycle) and a larger
CPU-scale one (d=384, 8 layers, 6 heads of 64, Nr=3). Each is then quantized by every method of
haipai_lightning.quant.methods.METHODS and evaluated on the same validation blocks: perplexity
before / after, model.safetensors size before / after, greedy batch-1 decode tokens/s before /
after (haipai_lightning/quant_report.py).

    python benchmarks/quantization.py [--quick] [--json out.json] [--threads 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
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


def train(model: HaipaiModel, dm: TextDataModule, steps: int, lr: float = 3e-3) -> float:
    """AdamW, linear warm-up, constant, linear decay over the last 30%; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 30, 1.0, max(0.1, (steps - s) / (0.3 * steps))))
    model.train()
    it, t0 = iter(dm.train_dataloader()), time.perf_counter()
    for _ in range(steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(dm.train_dataloader())
            b = next(it)
        out = model(b["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten()) + sum(out.aux_losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, nargs=2, default=None, help="training steps of the two models")
    p.add_argument("--val_batches", type=int, default=None, help="validation batches of 16 x 128 tokens")
    args = p.parse_args()
    steps = args.steps or ([60, 30] if args.quick else [200, 100])
    val_n = args.val_batches or (3 if args.quick else 10)
    dm = TextDataModule(source="kjv", seq_len=128, batch_size=16, vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    val = [b for _, b in zip(range(val_n), dm.val_dataloader())]
    methods = [m for m in METHODS if m != "fp32"]
    rows, headline, info = [], {}, {}
    for (name, shape), n in zip(SHAPES.items(), steps):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=4096, max_seq_len=128, n_recursions=3, sharing="middle_cycle", **shape)
        model = HaipaiModel(cfg, router=ExpertChoiceRouter)
        secs = train(model, dm, n)
        params = model.num_parameters()["unique"]
        print(f"{name}: {params / 1e6:.2f}M unique parameters, trained {n} steps in {secs:.0f} s", flush=True)
        reports = evaluate_methods(model.eval(), methods, val, new_tokens=32, reps=3)
        info[name] = {"unique_params": params, "train_steps": n, "train_s": secs}
        for r in reports:
            rows.append({"model": name, **r.as_row()})
        prefix = "" if name == "quickstart" else f"{name}_"
        by = {r.method: r for r in reports}
        headline[f"{prefix}ppl_fp32"] = reports[0].ppl_before
        for m in ("int8", "int4", "int4_rotated", "w4a4", "w4a4_rotated", "w4a4kv4"):
            headline[f"{prefix}ppl_{m}"] = by[m].ppl_after
        print(table([{"model": name, **r.as_row()} for r in reports], ["model", *COLUMNS]), flush=True)
        # written after each model, so a long run that is stopped keeps what it measured
        write_json(args.json, headline, rows=rows, models=info, val_blocks=val_n * 16, steps=steps)
    print(table(rows, ["model", *COLUMNS]))
    print("headline:", {k: round(v, 3) for k, v in headline.items()})


if __name__ == "__main__":
    main()
