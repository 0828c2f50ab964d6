"""Curriculum vs none at equal tokens: the validation-loss curve of the same model and schedule.

Staged (length, rare words): the data module scores every training document (length, or the
rare-word rate from the corpus's unigram statistics), cuts the documents into 3 stages of equal
token mass, easy first (cumulative: the last stage is all the data), and callbacks.CurriculumSwitch
moves to the next stage at 1/3 and 2/3 of the steps.
Warm-up (compression ratio, MTLD, Flesch: the measures of arXiv 2506.11300, datamodules/difficulty.py):
easy-to-hard over the first 30% of the steps, then uniform random sampling (the paper's best use).
The baseline trains on all the data throughout, uniformly shuffled.
Same initial weights, same steps x batch (equal tokens), same validation blocks.

    python benchmarks/curriculum.py [--quick] [--json out.json] [--steps N]
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from callbacks import CurriculumSwitch  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402
from haipai_lightning.train.schedules import TrapezoidLR  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402


class Curve(L.Callback):
    def __init__(self) -> None:
        self.points: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.points[trainer.global_step] = float(trainer.callback_metrics["val/loss"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--only", default=None,
                   help="comma-separated curricula to run beside none (e.g. compression,mtld,flesch)")
    args = p.parse_args()
    torch.set_num_threads(2)
    d, seq, batch = (96, 64, 8) if args.quick else (128, 128, 16)
    steps = args.steps or (60 if args.quick else 150)
    every = steps // 6
    rows, curves = [], {}
    runs = [(None, "stages"), ("length", "stages"), ("rare_words", "stages"),
            ("compression", "warmup"), ("mtld", "warmup"), ("flesch", "warmup")]
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r[0] is None or r[0] in keep]
    for kind, pacing in runs:
        dm = TextDataModule(source="kjv", seq_len=seq, batch_size=batch, vocab_size=4096, curriculum=kind,
                            curriculum_pacing=pacing, curriculum_warmup=0.3)
        L.seed_everything(0, verbose=False)
        cfg = ModelConfig(vocab_size=4096, d_model=d, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=int(8 * d / 3),
                          max_seq_len=seq, n_recursions=3, sharing="middle_cycle")
        module = MoRLightningModule(
            config=cfg, router=ExpertChoiceRouter,
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
            lr_scheduler=functools.partial(TrapezoidLR, warmup_steps=max(5, steps // 10), decay_fraction=0.2),
        )
        curve = Curve()
        staged = kind is not None and pacing == "stages"
        callbacks = [curve] + ([CurriculumSwitch(steps=[steps // 3, 2 * steps // 3])] if staged else [])
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                            val_check_interval=every, check_val_every_n_epoch=None, limit_val_batches=16,
                            num_sanity_val_steps=0, gradient_clip_val=1.0)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        name = kind or "none"
        curves[name] = curve.points
        row = {"curriculum": name, "pacing": pacing if kind else "-", "tokens": steps * batch * seq,
               "train s": time.perf_counter() - t0}
        row.update({f"val@{s}": v for s, v in sorted(curve.points.items())})
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(curve.points.items())), flush=True)
    print(f"\n{steps} steps of batch {batch}x{seq} (equal tokens), d={d}, 5 layers middle-cycle Nr=3 expert-choice, "
          f"stages switched at steps {steps // 3} and {2 * steps // 3}, warm-up over the first {int(0.3 * steps)} "
          "steps; val loss on the same 16 blocks")
    final = max(curves["none"])
    for row in rows:
        row["final vs none"] = row[f"val@{final}"] / curves["none"][final]
    print(table(rows, ["curriculum", "pacing", "tokens"] + [f"val@{s}" for s in sorted(curves["none"])]
                + ["final vs none", "train s"]))
    headline = {f"val_loss_{k}": v[final] for k, v in curves.items()}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, curves={k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
               steps=steps)


if __name__ == "__main__":
    main()
