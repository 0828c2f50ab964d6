"""IsoFLOP comparison on the default corpus (the MoR paper's Table 3, at CPU scale).

Vanilla, recursive (full recursion), MoR expert-choice Nr=2 and Nr=3, MoR token-choice Nr=3:
the same effective shape (8 layers, middle-cycle sharing), each trained until it has spent
the same training-FLOP budget (counted from what its routers decided, callbacks.FlopBudget),
then evaluated on the same validation blocks.

    python benchmarks/isoflop.py [--quick] [--json out.json] [--budget 8e12]
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from callbacks import FlopBudget  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402
from haipai_lightning.train.schedules import TrapezoidLR  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter  # noqa: E402

MODELS = [  # key, n_recursions, router
    ("vanilla", 1, FullRecursion),
    ("recursive", 3, FullRecursion),
    ("mor_ec_nr2", 2, ExpertChoiceRouter),
    ("mor_ec_nr3", 3, ExpertChoiceRouter),
    ("mor_tc_nr3", 3, TokenChoiceRouter),
]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--budget", type=float, default=None, help="training FLOPs per model")
    args = p.parse_args()
    d, seq, batch = (128, 128, 16) if args.quick else (192, 128, 16)
    val_batches = 20 if args.quick else 1.0  # the same validation blocks for every model
    budget = args.budget or (1e12 if args.quick else 8e12)
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=batch, vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    rows = []
    for key, nr, router in MODELS:
        L.seed_everything(0, verbose=False)
        cfg = ModelConfig(vocab_size=4096, d_model=d, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=int(8 * d / 3),
                          max_seq_len=seq, n_recursions=nr, sharing="middle_cycle")
        # every model gets the same schedule length in FLOPs; the LR decays over an estimated step count
        module = MoRLightningModule(
            config=cfg, router=router,
            optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
            lr_scheduler=functools.partial(TrapezoidLR, warmup_steps=30, decay_fraction=0.0),
        )
        fb = FlopBudget(budget)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=100, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[fb],
                            limit_val_batches=0, gradient_clip_val=1.0)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        train_s = time.perf_counter() - t0
        evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, limit_val_batches=val_batches)
        val = evaluator.validate(module, datamodule=dm, verbose=False)[0]
        n = module.model.num_parameters()
        rows.append({"model": key, "Nr": nr, "router": router.__name__, "unique params": n["unique"],
                     "effective params": n["effective"], "steps": trainer.global_step, "tokens": fb.tokens,
                     "train FLOPs": fb.flops, "val NLL": val["val/loss"], "train s": train_s})
        print(f"{key}: val NLL {val['val/loss']:.4f} after {trainer.global_step} steps ({train_s:.0f} s)", flush=True)
    print(f"\nIsoFLOP budget {budget:.2e} training FLOPs per model; 8 layers middle-cycle, d={d}, "
          f"batch {batch}x{seq}, King James Bible, BPE 4096")
    print(table(rows, ["model", "Nr", "router", "unique params", "steps", "tokens", "train FLOPs", "val NLL",
                       "train s"]))
    headline = {f"nll_{r['model']}": r["val NLL"] for r in rows}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, budget=budget)


if __name__ == "__main__":
    main()
