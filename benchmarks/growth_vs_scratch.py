"""Growth vs scratch at equal training FLOPs (the point of growing a model: HyperCloning, arXiv 2409.12903; Gstack, arXiv 2405.15319).

Scratch: the large model (MoR expert-choice Nr=3, d=192, 8 heads) trained from random init.
Grown: the half-width model (d=96, 4 heads) trained for `--grow_at` of the budget, then
HyperCloned x2 into exactly the large architecture (paired noise, 20 dB) by a GrowthSchedule
subclass whose `due` watches the FLOP counter, and trained on. Both spend the same training
FLOPs (counted from what the routers decided, callbacks.FlopBudget: the scratch run's total is the
grown run's budget) and are evaluated on the same validation blocks.

Depth (`--arms depth`): the same comparison for growing the MoR shared block by one unique layer (n_layers
5 -> 8 with Nr=3): scratch at the deep shape, Gstack (arXiv 2405.15319: the new layer a copy of
the block's last) and LESA (arXiv 2502.13794: the new layer predicted from its neighbours by an SVD
basis + a small MLP fitted on the model's consecutive layers), all at the deep scratch run's FLOPs.

    python benchmarks/growth_vs_scratch.py [--quick] [--json out.json] [--steps 160] [--grow_at 0.3]
                                           [--arms width,depth]
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
from callbacks import FlopBudget, GrowthSchedule  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.grow.arch import grow_arch  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402
from haipai_lightning.train.schedules import TrapezoidLR  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

GROW = {"op": "hyperclone", "args": {"width_factor": 2, "noise_snr_db": 20.0}}
DEPTH_GROWS = {"gstack": {"op": "gstack", "args": {"extra_layers": 1}},
               "lesa": {"op": "lesa", "args": {"extra_layers": 1}}}


class GrowAtFlops(GrowthSchedule):
    """Grow once, before the first step after `at_flops` training FLOPs have been spent."""

    def __init__(self, budget: FlopBudget, at_flops: float, entry: dict) -> None:
        super().__init__(every_step=True)
        self.budget, self.at_flops, self.entry = budget, at_flops, entry

    def due(self, trainer, pl_module):
        return self.entry if not pl_module.growth_log and self.budget.flops >= self.at_flops else None


def module(cfg: ModelConfig) -> MoRLightningModule:
    return MoRLightningModule(
        config=cfg, router=ExpertChoiceRouter,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=functools.partial(TrapezoidLR, warmup_steps=30, decay_fraction=0.0),  # FLOP-bounded: no decay
    )


def train(mod: MoRLightningModule, dm: TextDataModule, callbacks: list, max_steps: int = -1) -> tuple[L.Trainer, float]:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=100, max_steps=max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, limit_val_batches=0, gradient_clip_val=1.0)
    t0 = time.perf_counter()
    trainer.fit(mod, datamodule=dm)
    return trainer, time.perf_counter() - t0


def grown_arm(label: str, small: ModelConfig, large: ModelConfig, entry: dict, budget: float, grow_at: float,
              dm: TextDataModule) -> dict:
    """Train `small`, grow it by `entry` after grow_at x budget FLOPs, train on to the budget."""
    L.seed_everything(0, verbose=False)
    grown, fb = module(small), FlopBudget(max_flops=budget)
    grow_cb = GrowAtFlops(fb, grow_at * budget, entry)
    trainer, secs = train(grown, dm, [fb, grow_cb])
    rep = grow_cb.reports[0]
    assert grown.model.cfg == large, "the grown model must have exactly the scratch architecture"
    print(f"{label}: {trainer.global_step} steps (grew at step {grown.growth_log[0]['step']}, max |dlogits| "
          f"{rep.max_abs_dlogits:.2e}), {fb.flops:.3e} FLOPs ({secs:.0f} s)", flush=True)
    return {"arm": label, "unique params": rep.params_after["unique"], "steps": trainer.global_step,
            "steps before growth": grown.growth_log[0]["step"], "tokens": fb.tokens, "train FLOPs": fb.flops,
            "train s": secs, "module": grown, "dlogits at growth": rep.max_abs_dlogits}


def scratch_arm(label: str, large: ModelConfig, steps: int, dm: TextDataModule) -> tuple[dict, float]:
    L.seed_everything(0, verbose=False)
    scratch, fb = module(large), FlopBudget()
    trainer, secs = train(scratch, dm, [fb], max_steps=steps)
    print(f"{label}: {trainer.global_step} steps, {fb.flops:.3e} FLOPs ({secs:.0f} s)", flush=True)
    return ({"arm": label, "unique params": scratch.model.num_parameters()["unique"], "steps": trainer.global_step,
             "steps before growth": 0, "tokens": fb.tokens, "train FLOPs": fb.flops, "train s": secs,
             "module": scratch}, fb.flops)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="training steps of the scratch run (sets the FLOP budget)")
    p.add_argument("--grow_at", type=float, default=0.3, help="fraction of the budget spent before growing")
    p.add_argument("--arms", default="width,depth", help="comma list: width (HyperCloning) and/or depth (Gstack, LESA)")
    args = p.parse_args()
    arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    if not arms or arms - {"width", "depth"}:
        p.error(f"--arms {args.arms!r}: use width, depth or width,depth")
    steps = args.steps or (40 if args.quick else 160)
    seq, batch = 128, 16
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=batch, vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    small = ModelConfig(vocab_size=4096, d_model=96, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=256,
                        max_seq_len=seq, n_recursions=3, sharing="middle_cycle")
    arch = {"config": small.to_dict(), "mixer": None, "mlp": None, "router": None}
    evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=20 if args.quick else 1.0)
    headline, sections = {}, []
    if "width" in arms:
        large = ModelConfig.from_dict(grow_arch(arch, GROW["op"], GROW["args"])["config"])  # the grown architecture
        row, budget = scratch_arm("scratch (d=192)", large, steps, dm)
        rows = [row, grown_arm(f"grown d=96 -> 192 at {args.grow_at:.0%}", small, large, GROW, budget, args.grow_at, dm)]
        for r in rows:
            r["val NLL"] = evaluator.validate(r.pop("module"), datamodule=dm, verbose=False)[0]["val/loss"]
        headline.update(val_loss_grown=rows[1]["val NLL"], val_loss_scratch=rows[0]["val NLL"])
        headline["delta"] = headline["val_loss_grown"] - headline["val_loss_scratch"]
        sections.append(("width: HyperCloning d=96 -> 192", budget, rows))
    if "depth" in arms:
        deep = ModelConfig.from_dict(grow_arch(arch, "gstack", DEPTH_GROWS["gstack"]["args"])["config"])
        row, budget = scratch_arm(f"scratch (n_layers {deep.n_layers})", deep, steps, dm)
        rows = [row] + [grown_arm(f"{name} n_layers {small.n_layers} -> {deep.n_layers} at {args.grow_at:.0%}", small,
                                  deep, entry, budget, args.grow_at, dm) for name, entry in DEPTH_GROWS.items()]
        for r in rows:
            r["val NLL"] = evaluator.validate(r.pop("module"), datamodule=dm, verbose=False)[0]["val/loss"]
        headline.update(depth_val_loss_scratch=rows[0]["val NLL"], depth_val_loss_gstack=rows[1]["val NLL"],
                        depth_val_loss_lesa=rows[2]["val NLL"])
        headline["lesa_minus_gstack"] = rows[2]["val NLL"] - rows[1]["val NLL"]
        sections.append((f"depth: shared block +1 unique layer (n_layers {small.n_layers} -> {deep.n_layers})", budget, rows))
    cols = ["arm", "unique params", "steps", "steps before growth", "tokens", "train FLOPs", "dlogits at growth",
            "val NLL", "train s"]
    for title, budget, rows in sections:
        print(f"\nGrowth vs scratch at equal training FLOPs ({budget:.2e}), {title}; MoR expert-choice Nr=3, "
              f"batch {batch}x{seq}, King James Bible, BPE 4096, AdamW 3e-3")
        print(table(rows, cols))
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=[r for _, _, rows in sections for r in rows],
               budgets={t: b for t, b, _ in sections}, grow_at=args.grow_at, growth=GROW, depth_growth=DEPTH_GROWS,
               quick=args.quick, scratch_steps=steps)


if __name__ == "__main__":
    main()
