"""Curriculum callbacks: a schedule of ordered stages, switched at epoch boundaries or given steps.

    CurriculumSwitch   data: the TextDataModule's difficulty stages (data.curriculum), easy first
    DepthCurriculum    depth: expert-choice router capacities that grow stage by stage, so early
                       training sends few tokens deep (a recursion-depth curriculum)

The stage in force is a pure function of (epoch, global step), so a resumed run is in the
same stage at the same step as an uninterrupted one; the switches seen are also kept in the
callback's state (`history`) and the active stage is logged as `curriculum/stage`.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import lightning as L

from haipai_lightning.config import ConfigError


class Curriculum(L.Callback):
    """Base of the family: stage s+1 begins at epoch `epochs[s]` (or optimizer step `steps[s]`)."""

    def __init__(self, epochs: Sequence[int] | None = None, steps: Sequence[int] | None = None) -> None:
        """Args:
            epochs: epochs at which the next stage begins, ascending (e.g. [1, 2]: stage 1 from epoch 1).
            steps: optimizer steps at which the next stage begins, ascending (instead of epochs).
        """
        name = type(self).__name__
        if (epochs is None) == (steps is None):
            raise ConfigError(f"callbacks.{name}: give exactly one of epochs=[...] or steps=[...] (stage boundaries)")
        bounds = list(epochs if epochs is not None else steps)
        if any(b <= a for a, b in zip(bounds, bounds[1:])) or any(b < 1 for b in bounds):
            raise ConfigError(f"callbacks.{name}: boundaries {bounds} must be ascending and >= 1")
        self.by_epoch, self.bounds = epochs is not None, bounds
        self.history: list[dict[str, int]] = []  # {"stage", "epoch", "step"} at each switch seen
        self.active: int | None = None

    @property
    def n_stages(self) -> int:
        return len(self.bounds) + 1

    def stage_at(self, epoch: int, step: int) -> int:
        return bisect.bisect_right(self.bounds, epoch if self.by_epoch else step)

    def _check_stages(self, n: int, what: str) -> None:
        if n != self.n_stages:
            key = "epochs" if self.by_epoch else "steps"
            raise ConfigError(f"callbacks.{type(self).__name__}.{key}={self.bounds} gives {self.n_stages} stages but "
                              f"{what} has {n}; give {n - 1} boundaries")

    def apply_stage(self, stage: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put `stage` in force (subclasses); called before every training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stage = self.stage_at(trainer.current_epoch, trainer.global_step)
        if stage != self.active:
            self.history.append({"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step})
            self.active = stage
        self.apply_stage(stage, trainer, pl_module)
        pl_module.log(f"curriculum/{self.key}", float(stage), on_step=True, on_epoch=False)

    key = "stage"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.active = list(state["history"]), state["active"]


class CurriculumSwitch(Curriculum):
    """Moves the data module to its next difficulty stage at the given epochs (or steps).

    Needs `data.curriculum` (TextDataModule) with `data.curriculum_stages` = len(boundaries) + 1.
    Stages hold different numbers of blocks, so the train loader is rebuilt every epoch
    (this sets trainer.reload_dataloaders_every_n_epochs = 1). With `steps`, a switch takes
    effect at that exact step, inside an epoch: each position of the epoch draws from the
    stage of the step it will be trained at.

        trainer:
          callbacks:
            - {class_path: callbacks.CurriculumSwitch, init_args: {epochs: [1, 2]}}
        data: {curriculum: rare_words, curriculum_stages: 3}
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "curriculum", None):
            raise ConfigError("callbacks.CurriculumSwitch needs a data module with a curriculum: set data.curriculum "
                              "(length, rare_words or reference_loss) on datamodules.TextDataModule")
        if getattr(dm, "curriculum_pacing", "stages") != "stages":
            raise ConfigError(f"callbacks.CurriculumSwitch needs data.curriculum_pacing=stages, not "
                              f"{dm.curriculum_pacing!r} (warmup paces itself: drop the callback)")
        self._check_stages(dm.curriculum_stages, f"data.curriculum_stages={dm.curriculum_stages}")
        dm.curriculum_schedule = self.stage_at
        trainer.reload_dataloaders_every_n_epochs = 1


class DepthCurriculum(Curriculum):
    """Recursion-depth curriculum: the expert-choice router's capacities grow stage by stage.

    `capacities[s]` is the list of per-step capacities of stage s (non-increasing, in (0, 1]);
    the last stage must be the router's own `capacities`, which the checkpoint records.

        - class_path: callbacks.DepthCurriculum
          init_args: {steps: [200, 400], capacities: [[1, 0.2, 0.05], [1, 0.5, 0.2], [1, 0.67, 0.33]]}
    """

    key = "depth_stage"

    def __init__(self, capacities: Sequence[Sequence[float]], epochs: Sequence[int] | None = None,
                 steps: Sequence[int] | None = None) -> None:
        """Args:
            capacities: per stage, the capacity of each recursion step (the last = the router's capacities).
            epochs: epochs at which the next stage begins.
            steps: optimizer steps at which the next stage begins (instead of epochs).
        """
        super().__init__(epochs, steps)
        self.capacities = [[float(c) for c in caps] for caps in capacities]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        router = pl_module.model.router
        target = getattr(router, "capacities", None)
        if target is None:
            raise ConfigError(f"callbacks.DepthCurriculum needs an expert-choice router with capacities; model.router is "
                              f"{type(router).__name__} (use haipai_lightning.ExpertChoiceRouter)")
        self._check_stages(len(self.capacities), f"callbacks.DepthCurriculum.capacities ({len(self.capacities)} stages)")
        for s, caps in enumerate(self.capacities):
            if len(caps) != len(target) or any(not 0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
                raise ConfigError(f"callbacks.DepthCurriculum.capacities[{s}]={caps} must hold {len(target)} "
                                  "non-increasing values in (0, 1], one per recursion step")
            if s and any(b < a for a, b in zip(self.capacities[s - 1], caps)):
                raise ConfigError(f"callbacks.DepthCurriculum.capacities[{s}]={caps} must not be below stage {s - 1}'s "
                                  "(capacities grow over training)")
        if [round(c, 6) for c in self.capacities[-1]] != [round(float(c), 6) for c in target]:
            raise ConfigError(f"callbacks.DepthCurriculum.capacities[-1]={self.capacities[-1]} must equal the router's "
                              f"capacities {list(target)} (model.router.init_args.capacities), which checkpoints record")

    def apply_stage(self, stage: int, trainer, pl_module) -> None:
        pl_module.model.router.capacities = list(self.capacities[stage])
        pl_module.log("curriculum/mean_capacity", sum(self.capacities[stage]) / len(self.capacities[stage]))

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.model.router.capacities = list(self.capacities[-1])  # what the checkpoint's arch says
