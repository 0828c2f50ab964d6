"""GracefulStop: Ctrl-C / SIGTERM end a run at an optimizer-step boundary, in last.ckpt, exactly resumable.

Lightning alone saves the interrupt checkpoint wherever the KeyboardInterrupt lands (often in the
middle of a training step): its progress counters then say "one batch more than the weights", and a
resumed run validates one step early and never saves its final step. SIGTERM exits 0, like a
finished run, and ModelCheckpoint(save_on_exception=True) names the file `best-...`.

With this callback (added by `haipai fit` by default):
- the first Ctrl-C or SIGTERM during training only raises a flag; the current optimizer step and
  the validation due after it finish, then Lightning's own SIGTERM exit path stops the loop at the
  end of that step (the boundary its resume logic is built for). On the last batch of an epoch it
  trains one step more: Lightning does not resume a stop at an epoch end exactly;
- the state after that last completed optimizer step is written to last.ckpt (the file `--ckpt_path`
  resumes from; atomically with AtomicCheckpointIO), so resuming reproduces the uninterrupted run:
  same losses, validation at the same steps, final checkpoint at the final step;
- the process exits 130 after SIGINT and 143 after SIGTERM (128 + the signal, like a shell);
- a second Ctrl-C / SIGTERM quits at once, without saving (last.ckpt keeps the last save);
- the final step is written to last.ckpt when no ModelCheckpoint saves it (ModelCheckpoint saves
  last.ckpt only with a top-k save, e.g. when a validation falls on the last step), right after it,
  where every_n_train_steps saves: a `--ckpt_path` with a larger max_steps trains on exactly.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(L.Callback):
    """Stop at a step boundary on Ctrl-C / SIGTERM, save last.ckpt, exit 128 + signal; save the final step."""

    def __init__(self, save_final: bool = True) -> None:
        """Args:
            save_final: at the end of training, write last.ckpt (of each ModelCheckpoint with save_last) if the
                final step was not saved yet.
        """
        self.save_final = save_final
        self._signum = 0  # the signal that asked for a stop (0: none)
        self._armed = False  # we set Lightning's SIGTERM flag: its loop stops at the end of this step
        self._forced = False  # a second signal: quit now, without saving
        self._previous: dict[int, Any] = {}
        self._step_at_batch_start = -1
        self._saved: dict[int, int] = {}  # id(ModelCheckpoint) -> the step this callback last wrote its last.ckpt at

    # -------------------------------------------------------------- signals
    def _handler(self, signum: int, frame: Any) -> None:
        if self._signum:  # the second one: the user does not want to wait
            self._forced = True
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._signum = signum  # acted on at the next step boundary (no printing here: not reentrant-safe)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread: Lightning's defaults stay
        for s in _SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                self._previous[s] = signal.signal(s, self._handler)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    @staticmethod
    def _set_lightning_stop(trainer: L.Trainer, value: bool) -> None:
        # Lightning's SIGTERM flag: checked at the end of each training batch (after the validation and the
        # bookkeeping of the step) and of each epoch, where it raises SIGTERMException: a clean boundary.
        trainer._signal_connector.received_sigterm = value

    def _requested(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        signum = self._signum
        if trainer.world_size > 1:  # all ranks stop after the same step
            t = torch.tensor(signum, device=pl_module.device)
            signum = int(trainer.strategy.reduce(t, reduce_op="max"))
            self._signum = self._signum or signum
        return signum

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signum, self._armed, self._forced, self._step_at_batch_start = 0, False, False, -1
        if trainer.received_sigterm:  # a SIGTERM during the sanity check: stop after the first step
            self._signum = signal.SIGTERM
            self._set_lightning_stop(trainer, False)
        self._install()  # after Lightning's own SIGTERM handler (registered before the run), replacing it

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # gradient accumulation: no optimizer step ended here, not a boundary
        self._maybe_arm(trainer, pl_module)
        if self.save_final and 0 < trainer.max_steps <= trainer.global_step:
            # the final step, saved here (where ModelCheckpoint's every_n_train_steps saves: a state Lightning
            # resumes exactly, e.g. to train longer) unless a ModelCheckpoint saves this step itself
            stale = [mc for mc in self._stale(trainer)
                     if not (mc._every_n_train_steps >= 1 and trainer.global_step % mc._every_n_train_steps == 0)]
            self._save(trainer, stale, mark_saved=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._armed and not trainer.sanity_checking:
            self._set_lightning_stop(trainer, False)  # Lightning would stop mid-validation: let it finish

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._armed:
            self._set_lightning_stop(trainer, True)
        else:
            self._maybe_arm(trainer, pl_module)  # a signal that came during this validation

    def _maybe_arm(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._requested(trainer, pl_module) or self._armed:
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the run ends after this step anyway: it finishes normally, its final step saved
        bp = trainer.fit_loop.epoch_loop.batch_progress
        if (bp.is_last_batch or bp.current.ready >= trainer.num_training_batches) and trainer.num_training_batches > 1:
            # Lightning's stop at an epoch end leaves counters it does not resume from exactly (it skips the
            # next epoch's batches): stop after the next step, inside the next epoch
            return
        self._armed = True
        self._set_lightning_stop(trainer, True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if self._forced:
            _say(trainer, "stopped at once by a second signal: nothing saved after the last checkpoint")
            return
        if not self._signum or not isinstance(exception, SIGTERMException):
            return
        name = signal.Signals(self._signum).name
        mcs = _model_checkpoints(trainer)
        paths = self._save(trainer, [mc for mc in mcs if mc.save_last] or mcs[:1], mark_saved=True)
        exception.code = 128 + self._signum  # the process exits 130 (SIGINT) / 143 (SIGTERM)
        if paths:
            _say(trainer, f"{name}: stopped after step {trainer.global_step}, saved {paths[0]}; "
                          f"resume with --ckpt_path {paths[0]}")
        else:
            _say(trainer, f"{name}: stopped after step {trainer.global_step}; no ModelCheckpoint, nothing saved")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.save_final:  # a final step no one saved yet (max_epochs runs, a save deferred to a validation)
            self._save(trainer, self._stale(trainer), mark_saved=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    # ---------------------------------------------------------------- saves
    def _stale(self, trainer: L.Trainer) -> list[ModelCheckpoint]:
        """The ModelCheckpoints with save_last whose last.ckpt does not hold the current step."""
        step = trainer.global_step
        return [mc for mc in _model_checkpoints(trainer) if mc.save_last
                and getattr(mc, "_last_global_step_saved", None) != step and self._saved.get(id(mc)) != step]

    def _save(self, trainer: L.Trainer, targets: list[ModelCheckpoint], mark_saved: bool) -> list[str]:
        """Write the current state to the last.ckpt of each of `targets`.

        mark_saved=False leaves ModelCheckpoint's "saved at this step" marker as it was, so its own saves of
        this step (the top-k after a validation) still happen; True stops them (and save_on_exception)."""
        for mc in targets:
            before = getattr(mc, "_last_global_step_saved", None)
            metrics = mc._monitor_candidates(trainer)
            if mc.save_last is True:
                mc._save_last_checkpoint(trainer, metrics)  # its naming (last-v1 in a used directory), old one removed
            else:  # "link" would point at an older top-k file, False writes none: write the state itself
                mc.last_model_path = mc.format_checkpoint_name(metrics, mc.CHECKPOINT_NAME_LAST)
                mc._save_checkpoint(trainer, mc.last_model_path)
            self._saved[id(mc)] = trainer.global_step
            if not mark_saved:
                mc._last_global_step_saved = before
        if mark_saved:
            for mc in _model_checkpoints(trainer):
                mc._last_global_step_saved = trainer.global_step
        return [mc.last_model_path for mc in targets]


def _model_checkpoints(trainer: L.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]


def _say(trainer: L.Trainer, line: str) -> None:
    if trainer.is_global_zero:
        print(f"haipai: {line}", file=sys.stderr, flush=True)
