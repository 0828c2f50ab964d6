"""RouterTelemetry overhead: training step time with the callback on (default interval) vs off, in one run.

The quickstart model (MoR expert-choice, Nr=3) on the King James Bible, TensorBoard logging
on. One fit; after a warm-up of 50 steps the callback is switched on and off *step by step*:
it runs on every odd step and on every 50th step (its logging steps, with the histogram and
the gradient norms), and sits out the other steps. Neighbouring steps share the model, the
data stream and the machine's load, which on a shared 2-core machine swings by several x
within a minute: whole fits, or even blocks of 50 steps, compared one against another,
differ by far more than the 5% this measures. The "on" steps carry one logging step per
~25 instead of per 50, so the ratio errs high: an upper bound on the default's overhead.

A step's time is the interval between consecutive `on_train_batch_start` calls: data,
forward, backward, optimizer, callbacks, logging. Headline `overhead_ratio` = mean "on"
step / mean "off" step (wall time); also in process CPU time, and from the time spent
inside the callback's hooks (a third estimate, which other processes cannot disturb). The
validation-end depth picture, which is not part of a training step, is timed on its own.

    python benchmarks/telemetry_overhead.py [--quick] [--json out.json] [--threads 2]
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from callbacks import RouterTelemetry  # noqa: E402
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.analysis.depth_picture import DEFAULT_TEXT, write_depth_pictures  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402
from haipai_lightning.train.schedules import TrapezoidLR  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class Switched(L.Callback):
    """Runs a RouterTelemetry on odd steps and its logging steps only; times every step and the hooks."""

    def __init__(self, inner: RouterTelemetry, warmup: int) -> None:
        self.inner, self.warmup = inner, warmup
        self.active = False
        self.marks: list[tuple[int, bool, float, float]] = []  # (step, on, wall, cpu) at each batch start
        self.hook_s = 0.0

    def _mark(self, step: int) -> None:
        self.marks.append((step, self.active, time.perf_counter(), time.process_time()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        s = trainer.global_step + 1  # the step this batch completes (= global_step in on_train_batch_end)
        self.active = s > self.warmup and (s % 2 == 1 or s % self.inner.every == 0)
        self._mark(s)

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark(trainer.global_step + 1)

    def on_train_batch_end(self, *args, **kw) -> None:
        if self.active:
            t = time.perf_counter()
            self.inner.on_train_batch_end(*args, **kw)
            self.hook_s += time.perf_counter() - t

    def on_before_optimizer_step(self, *args, **kw) -> None:
        if self.active:
            t = time.perf_counter()
            self.inner.on_before_optimizer_step(*args, **kw)
            self.hook_s += time.perf_counter() - t

    def step_times(self) -> list[tuple[int, bool, float, float]]:
        """(step, on, wall s, CPU s) of every timed step."""
        return [(s, on, w1 - w0, c1 - c0) for (s, on, w0, c0), (_, _, w1, c1) in zip(self.marks, self.marks[1:])
                if s > self.warmup]


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(threads=2)  # the common parser's --threads; 2 = this machine's cores
    args = p.parse_args()
    q = yaml.safe_load(QUICK.read_text())
    seq, batch, steps = (64, 8, 300) if args.quick else (128, 16, 600)
    vocab = q["data"]["vocab_size"]
    tele = RouterTelemetry()  # the defaults: every 50 steps, window 500
    warmup = tele.every
    sw = Switched(tele, warmup)
    L.seed_everything(0, verbose=False)
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=batch, vocab_size=vocab)
    module = MoRLightningModule(
        config=ModelConfig(**{**q["model"]["config"], "vocab_size": vocab}),
        router=functools.partial(ExpertChoiceRouter, **q["model"]["router"]["init_args"]),
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        lr_scheduler=functools.partial(TrapezoidLR, warmup_steps=50, decay_fraction=0.3, min_lr_ratio=0.1))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=TensorBoardLogger(root),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=10, callbacks=[sw])
        trainer.fit(module, datamodule=dm)
        t0 = time.perf_counter()
        write_depth_pictures(module.model, dm.tokenizer, DEFAULT_TEXT, root, "_bench")
        picture_s = time.perf_counter() - t0
    st = sw.step_times()
    arm = {flag: [(w, c) for _, on, w, c in st if on == flag] for flag in (False, True)}
    wall = {f: statistics.fmean(w for w, _ in v) for f, v in arm.items()}
    cpu = {f: statistics.fmean(c for _, c in v) for f, v in arm.items()}
    med = {f: statistics.median(w for w, _ in v) for f, v in arm.items()}
    hook_ms = sw.hook_s / len(arm[True]) * 1e3
    logging_steps = sum(1 for s, on, _, _ in st if on and s % tele.every == 0)
    rows = [{"arm": "telemetry off", "steps": len(arm[False]), "mean ms": wall[False] * 1e3,
             "median ms": med[False] * 1e3, "CPU ms": cpu[False] * 1e3, "hook ms": 0.0, "ratio": 1.0, "CPU ratio": 1.0},
            {"arm": f"telemetry on (every {tele.every})", "steps": len(arm[True]), "mean ms": wall[True] * 1e3,
             "median ms": med[True] * 1e3, "CPU ms": cpu[True] * 1e3, "hook ms": hook_ms,
             "ratio": wall[True] / wall[False], "CPU ratio": cpu[True] / cpu[False]}]
    print(f"\nquickstart model (MoR expert-choice Nr=3, d={q['model']['config']['d_model']}), batch {batch}x{seq}, "
          f"one fit of {steps} steps ({warmup} warm-up), telemetry on odd steps + its {logging_steps} logging steps, "
          f"torch threads {torch.get_num_threads()}")
    print(table(rows, ["arm", "steps", "mean ms", "median ms", "CPU ms", "hook ms", "ratio", "CPU ratio"]))
    print(f"depth picture at validation end: {picture_s * 1e3:.1f} ms (once per validation, not in a step)")
    headline = {"overhead_ratio": wall[True] / wall[False], "overhead_ratio_cpu": cpu[True] / cpu[False],
                "overhead_ratio_hooks": 1 + hook_ms / (wall[False] * 1e3)}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, picture_ms=picture_s * 1e3, logging_steps=logging_steps,
               step_ms=[(s, on, w * 1e3) for s, on, w, _ in st],
               shape={"batch": batch, "seq_len": seq, "steps": steps, "warmup": warmup})


if __name__ == "__main__":
    main()
