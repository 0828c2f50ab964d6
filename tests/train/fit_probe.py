"""A callback that `haipai fit` subprocesses of the interrupt / divergence / crash tests load by class_path
(`--trainer.callbacks+=fit_probe.FitProbe`, with tests/train on PYTHONPATH).

It appends one JSON line per event to `path`: {"train": global_step, "loss": ...} after every optimizer
step, {"val": global_step, "loss": val/loss} after every validation (sanity checks excluded) and
{"save": global_step, "digest": weights_digest(...)} for every checkpoint written. It can
also send its own process a signal at a chosen point, so a test interrupts a run at a known moment:
`signal_at` steps done, in phase "step" (between the backward and the optimizer step: the middle of a
training step), "val" (after the first batch of the validation that follows that step) or "batch_end".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L


class FitProbe(L.Callback):
    def __init__(self, path: str, signal_at: int = 0, signal_name: str = "SIGINT", phase: str = "step",
                 sleep: float = 0.0) -> None:
        """Args:
            path: JSON-lines file the events are appended to.
            signal_at: send the signal once this many optimizer steps are done (0 = never).
            signal_name: SIGINT or SIGTERM.
            phase: step, val or batch_end (see the module docstring).
            sleep: seconds to sleep after each step (slows a run down so an outside kill lands mid-run).
        """
        self.path, self.signal_at, self.signal_name, self.phase, self.sleep = path, signal_at, signal_name, phase, sleep
        self._sent = False

    def _write(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()

    def _signal(self, trainer: L.Trainer) -> None:
        if not self._sent and self.signal_at and trainer.global_step >= self.signal_at:
            self._sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "step":
            self._signal(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(train=trainer.global_step, loss=float(outputs["loss"]))
        if self.phase == "batch_end":
            self._signal(trainer)
        if self.sleep:
            time.sleep(self.sleep)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "val" and not trainer.sanity_checking:
            self._signal(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write(save=trainer.global_step, digest=weights_digest(checkpoint["state_dict"]))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(val=trainer.global_step, loss=float(trainer.callback_metrics["val/loss"]))


def weights_digest(state_dict) -> float:
    """A number that changes with any weight (NaN if any weight is)."""
    return float(sum(v.double().abs().sum() for v in state_dict.values() if v.is_floating_point()))


# ------------------------------------------------------------------ for the tests: one `haipai fit` command
ROOT = Path(__file__).resolve().parents[2]
HAIPAI = str(Path(sys.executable).with_name("haipai"))
# the shared tiny model (tests/helpers.TINY) on 60 KJV chapters: 12 training batches per epoch
TINY_FIT = ["--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--data.max_documents", "60", "--data.vocab_size", "512", "--data.seq_len", "32", "--data.batch_size", "4",
            "--model.config.d_model", "32", "--model.config.n_heads", "4", "--model.config.n_kv_heads", "2",
            "--model.config.ffn_hidden", "64", "--model.config.max_seq_len", "64",
            "--trainer.limit_val_batches", "2", "--trainer.limit_train_batches", "12",
            "--trainer.enable_progress_bar", "false"]


def fit(root, events, cache, *extra, callbacks: bool = False, signal_at: int = 0, signal_name: str = "SIGINT",
        phase: str = "step", timeout: float = 300, popen: bool = False):
    """Run `haipai fit` on TINY_FIT with a FitProbe writing to `events`; extra args last (they win).

    callbacks=False drops the config's callbacks (FitSummary, RouterTelemetry); popen=True returns the
    running Popen (its output in root/fit.log) instead of the CompletedProcess.
    """
    cmd = [HAIPAI, "fit", *TINY_FIT, "--data.cache_dir", str(cache), "--trainer.default_root_dir", str(root),
           *([] if callbacks else ["--trainer.callbacks", "[]"]),
           "--trainer.callbacks+=fit_probe.FitProbe", "--trainer.callbacks.path", str(events),
           "--trainer.callbacks.signal_at", str(signal_at), "--trainer.callbacks.signal_name", signal_name,
           "--trainer.callbacks.phase", phase, *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)]),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if popen:
        Path(root).mkdir(parents=True, exist_ok=True)
        with open(Path(root) / "fit.log", "w") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def read_events(*paths):
    """(train {step: loss}, val [(step, loss)], saves [(step, digest)]) of event files, later files winning."""
    train, val, saves = {}, [], []
    for p in paths:
        if not Path(p).exists():
            continue
        for line in Path(p).read_text().splitlines():
            e = json.loads(line)
            if "train" in e:
                train[e["train"]] = e["loss"]
            elif "val" in e:
                val.append((e["val"], e["loss"]))
            else:
                saves.append((e["save"], e["digest"]))
    return train, val, saves
