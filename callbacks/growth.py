"""GrowthSchedule: grow the model during `haipai fit` (MoE upcycling, HyperCloning, Gstack).

    trainer:
      callbacks:
        - class_path: callbacks.GrowthSchedule
          init_args:
            schedule:
              - {at_epoch: 1, op: upcycle_to_moe, args: {n_experts: 8, top_k: 2}}
              - {at_epoch: 2, op: hyperclone, args: {width_factor: 2, noise_snr_db: 20}, lr_scale: 0.5}
              - {at_step: 900, op: gstack, args: {extra_layers: 1}}

*When* is one overridable hook, `due(trainer, pl_module) -> entry | None`, asked before the first
training batch of every epoch (also right after a resume), and before every batch when the schedule
has `at_step` entries or `every_step` is set; at most one op is applied per boundary, so give
entries distinct epochs / steps. *What* is `haipai_lightning.grow.ops`'s pure ops. Applying an entry:

1. grows a copy (the running model is untouched), measures max |delta logits| on a probe batch
   (the last training batch seen, else fixed random tokens) and checks it against the entry's
   `tolerance` (default per op: growth.DEFAULT_TOLERANCE, relative to max |logits|); on a
   violation the old model stays in place and GrowthError says by how much;
2. installs the grown model, rebuilds the optimizer and LR scheduler for its parameters: the
   scheduler continues where it was (same step, same base LRs times `lr_scale`), Adam moments
   are carried where the parameter mapping is exact (unchanged tensors, Gstack's copied layers,
   upcycled experts from their dense MLP; HyperCloning restarts them: every tensor changes shape);
3. appends the op to `pl_module.growth_log` (saved in every checkpoint: loading replays it), and
   logs `growth/*` scalars and a text report to TensorBoard.

Resuming from a checkpoint is exact: the log in the checkpoint says how many entries were
applied, so `due` continues with the next one; growth never touches the global RNG.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from haipai_lightning.config import ConfigError
from haipai_lightning.grow.ops import DEFAULT_TOLERANCE, GrowthReport, default_probe, grow
from haipai_lightning.grow.arch import check_op

_ENTRY_KEYS = {"at_epoch", "at_step", "op", "args", "tolerance", "lr_scale"}


class GrowthError(ConfigError):
    """A growth op changed the function by more than its tolerance (the model was left as it was)."""


class GrowthSchedule(L.Callback):
    def __init__(self, schedule: list[dict[str, Any]] | None = None, every_step: bool = False,
                 probe_rows: int = 4) -> None:
        """Args:
            schedule: entries {at_epoch: E (grow at the start of epoch E) or at_step: S (before optimizer step
                S+1), op: upcycle_to_moe | hyperclone | gstack, args: {...}, tolerance: max relative |delta
                logits| (default per op; null = no check), lr_scale: multiply the LRs from here on (default 1)},
                applied in order.
            every_step: ask `due` before every training batch too (a subclass growing on a step signal).
            probe_rows: rows of the last training batch used to measure the function change.
        """
        self.schedule = [dict(e) for e in (schedule or [])]
        for i, e in enumerate(self.schedule):
            where = f"callbacks.GrowthSchedule schedule[{i}]"
            if set(e) - _ENTRY_KEYS:
                raise ConfigError(f"{where}: unknown key(s) {sorted(set(e) - _ENTRY_KEYS)}; valid: {sorted(_ENTRY_KEYS)}")
            if ("at_epoch" in e) == ("at_step" in e):
                raise ConfigError(f"{where}: give exactly one of at_epoch or at_step")
            check_op(e.get("op", ""), e.get("args") or {}, where)
        self.every_step = every_step or any("at_step" in e for e in self.schedule)
        self.probe_rows = probe_rows
        self._probe: torch.Tensor | None = None
        self.reports: list[GrowthReport] = []

    # ------------------------------------------------------------------ the hook
    def due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The entry to apply now, or None. Default: the next schedule entry (entries already in the
        model's growth log count as done) once its epoch / step has come."""
        done = len(pl_module.growth_log)
        if done >= len(self.schedule):
            return None
        e = self.schedule[done]
        if "at_epoch" in e:
            return e if trainer.current_epoch >= e["at_epoch"] else None
        return e if trainer.global_step >= e["at_step"] else None

    # ----------------------------------------------------------------- lightning
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:  # refuse before training, not at the first growth
            raise ConfigError(_SINGLE_PROCESS)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_seen: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # The epoch boundary is the first batch of an epoch: Lightning skips on_train_epoch_start when it
        # resumes from a checkpoint written at the end of an epoch, and growth must not be skipped with it.
        if isinstance(batch, dict) and "input_ids" in batch:
            self._probe = batch["input_ids"][: self.probe_rows].detach()
        new_epoch = trainer.current_epoch != getattr(self, "_epoch_seen", None)
        self._epoch_seen = trainer.current_epoch
        if new_epoch or self.every_step:
            self._maybe_grow(trainer, pl_module)

    def _maybe_grow(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # at most one op per boundary: `due` may keep state (a plateau watch) that an op should reset
        entry = self.due(trainer, pl_module)
        if entry is not None:
            self.apply(trainer, pl_module, entry)

    # --------------------------------------------------------------------- apply
    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, entry: dict[str, Any]) -> GrowthReport:
        op, args = entry["op"], dict(entry.get("args") or {})
        check_op(op, args, "growth entry")
        if trainer.world_size > 1:
            raise ConfigError(_SINGLE_PROCESS)
        old = pl_module.model
        probe = self._probe if self._probe is not None else default_probe(old)
        new, report = grow(old, op, args, probe=probe.to(next(old.parameters()).device))
        tol = entry.get("tolerance", DEFAULT_TOLERANCE[op])
        if tol is not None and not report.rel_dlogits <= tol:
            raise GrowthError(
                f"growth op {op}({args}) changed the logits by {report.max_abs_dlogits:.3g} "
                f"({report.rel_dlogits:.3g} of max |logits|), over its tolerance {tol:g}; the model was left "
                "unchanged -- check the op's arguments, or set the entry's tolerance (null = no check)"
            )
        old_log, old_opts = list(pl_module.growth_log), (trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs)
        try:
            pl_module.install_model(new)
            pl_module.growth_log.append({"op": op, "args": args, "epoch": trainer.current_epoch,
                                         "step": trainer.global_step, **_plain_summary(report)})
            if trainer.strategy.optimizers:
                self._rebuild_optimizers(trainer, pl_module, old, report, float(entry.get("lr_scale", 1.0)))
        except Exception:  # restore the previous model, log and optimizers
            pl_module.install_model(old)
            pl_module.growth_log[:] = old_log
            trainer.strategy.optimizers, trainer.strategy.lr_scheduler_configs = old_opts
            raise
        self.reports.append(report)
        self._log(trainer, report)
        rank_zero_info(f"growth: {op}({args}) at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                       f"{report.params_before['unique'] / 1e6:.2f}M -> {report.params_after['unique'] / 1e6:.2f}M "
                       f"unique parameters, max |delta logits| {report.max_abs_dlogits:.3g}")
        return report

    @staticmethod
    def _rebuild_optimizers(trainer: L.Trainer, pl_module: L.LightningModule, old_model: torch.nn.Module,
                            report: GrowthReport, lr_scale: float) -> None:
        old_opt = trainer.strategy.optimizers[0]
        old_scheds = [c.scheduler for c in trainer.strategy.lr_scheduler_configs]
        old_params = dict(old_model.named_parameters())
        trainer.strategy.setup_optimizers(trainer)  # configure_optimizers() on the grown model
        opt = trainer.strategy.optimizers[0]
        # LRs continue: same schedule position and base LRs (times lr_scale). Groups are matched by name
        # (optim.param_groups names them): growth can add one, e.g. stacked experts after upcycling.
        old_groups = {g.get("name", str(i)): g for i, g in enumerate(old_opt.param_groups)}
        ref = old_opt.param_groups[0]
        ratio = ref["lr"] / ref["initial_lr"] if ref.get("initial_lr") else 1.0  # where the schedule stands
        for i, g in enumerate(opt.param_groups):
            og = old_groups.get(g.get("name", str(i)))
            base = og.get("initial_lr", og["lr"]) if og is not None else g.get("initial_lr", g["lr"])
            lr = og["lr"] if og is not None else base * ratio
            g["initial_lr"], g["lr"] = base * lr_scale, lr * lr_scale
        for cfg, old_s in zip(trainer.strategy.lr_scheduler_configs, old_scheds):
            state = old_s.state_dict()
            state["base_lrs"] = [g["initial_lr"] for g in opt.param_groups]
            state["_last_lr"] = [g["lr"] for g in opt.param_groups]
            cfg.scheduler.load_state_dict(state)
        # optimizer moments where the mapping is exact
        for name, p in pl_module.model.named_parameters():
            src, how = report.param_map.get(name, (None, None))
            old_p = old_params.get(src) if src else None
            if old_p is None or old_p not in old_opt.state:
                continue
            state = {k: _map_state(v, p, how) for k, v in old_opt.state[old_p].items()}
            if all(v is not None for v in state.values()):  # else this parameter's state restarts
                opt.state[p] = state

    @staticmethod
    def _log(trainer: L.Trainer, report: GrowthReport) -> None:
        step = trainer.global_step
        metrics = {"growth/params_unique": report.params_after["unique"],
                   "growth/params_effective": report.params_after["effective"],
                   "growth/max_abs_dlogits": report.max_abs_dlogits, "growth/rel_dlogits": report.rel_dlogits,
                   "growth/n_ops": len(trainer.lightning_module.growth_log)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                rows = "\n".join(f"| {k} | {v} |" for k, v in _plain_summary(report).items())
                exp.add_text("growth/report", f"| field | value |\n|---|---|\n{rows}", global_step=step)


# DDP / FSDP wrap the parameters at setup; a grown model would escape them
_SINGLE_PROCESS = ("callbacks.GrowthSchedule grows single-process training only; set trainer.devices: 1 "
                   "for the growth run, then resume its grown checkpoint on more devices")


def _map_state(v: Any, p: torch.Tensor, how: str) -> Any:
    """One optimizer-state entry of an old parameter -> the entry of the new parameter p, or None
    when it does not map (the parameter's state then restarts).

    Entries shaped like the parameter (Adam's moments) map by `how`; for the same tensor ("same")
    or an exact copy ("copy") every entry carries over whatever its shape, so GaLore's low-rank
    moments and projectors and bitsandbytes' quantization maps survive growth too.
    """
    if not isinstance(v, torch.Tensor):
        return copy.deepcopy(v)
    if v.dim() == 0 or v.shape == p.shape or how in ("same", "copy"):
        return v.clone()
    if how == "expert" and v.dim() == 2 and v.t().shape == p.shape[1:]:  # dense Linear (H, D) -> experts (E, D, H)
        return v.t().unsqueeze(0).expand(p.shape).clone()
    return None


def _plain_summary(report: GrowthReport) -> dict[str, Any]:
    s = report.summary()
    return {k: v for k, v in s.items() if k not in ("op", "args")}
