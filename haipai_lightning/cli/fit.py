"""The LightningCLI behind `haipai fit / validate / test / predict` (cli/main.py dispatches here).

Every field of the module, the data module and the trainer is a typed, documented argument
(`haipai fit --help`); components are swapped with `class_path` / `init_args` in YAML. Only these
subcommands import Lightning's CLI; `haipai generate / serve / export ...` start without it.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from haipai_lightning.config import ConfigError
from haipai_lightning.io.arch import COMPONENTS, arch_diff, make_arch
from haipai_lightning.io.checkpoint import load_checkpoint_file
from haipai_lightning.io.checkpoint_io import AtomicCheckpointIO, SafeCheckpointIO, link_checkpoint
from haipai_lightning.io.loader import checkpoint_meta
from haipai_lightning.io.spec import component_spec
from haipai_lightning.train.module import MoRLightningModule


class HaipaiCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from datamodules.text import resolve_vocab_size

        # one source of truth: the data's tokenizer (the BPE trained, a tokenizer.json, the prepared
        # directories' tokenizer) sets the embedding size
        parser.link_arguments(("data.vocab_size", "data.prepared", "data.tokenizer_path"), "model.config.vocab_size",
                              compute_fn=resolve_vocab_size)

    def _set_seed(self) -> None:
        """LightningCLI's seeding, without its "Seed set to" line on stderr (the seed is in config.yaml)."""
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        seed = cfg.get("seed_everything")
        if seed is False:
            return
        cfg["seed_everything"] = seed_everything(None if seed is True else seed, workers=True, verbose=False)

    def _parse_ckpt_path(self) -> None:
        """--ckpt_path: the command line's config decides; the checkpoint only has to agree with it.

        LightningCLI would merge the checkpoint's saved hyperparameters into the config, and
        jsonargparse would then import and call whatever class paths they name (optimizer,
        scheduler, components): a crafted checkpoint could run code. Nothing of the file is
        executed here: it is read with weights_only=True, its architecture resolves through the
        allowlist (io/spec.py) and is compared with the command line's; its optimizer and
        scheduler class paths are compared as strings.
        """
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning's named checkpoints
            return
        ckpt = load_checkpoint_file(ckpt_path)  # one line for a missing, damaged or pickled file
        meta = checkpoint_meta(ckpt, str(ckpt_path))
        diffs = arch_diff(meta["arch"], _arch_of(self.config[sub]))
        if diffs:
            raise ConfigError(
                "the checkpoint has another architecture: " + "; ".join(diffs[:4])
                + " -- pass the config it was trained with (its run directory holds config.yaml)"
            )
        saved = ckpt.get("hyper_parameters") or {}
        model = self.config[sub].model
        for key in ("optimizer", "lr_scheduler"):
            was, now = _class_path(saved.get(key)), _class_path(model.get(key))
            if was is not None and now is not None and was != now and sub == "fit":
                raise ConfigError(f"--ckpt_path was trained with model.{key} {was}, the config gives {now}: resuming "
                                  f"restores its state, so use the same {key} (or start without --ckpt_path)")

    def instantiate_trainer(self, **kwargs: Any):
        from callbacks.graceful_stop import GracefulStop  # callbacks/ imports late: other subcommands start fast
        from callbacks.nonfinite import NonFiniteGuard

        trainer = super().instantiate_trainer(**kwargs)
        # every checkpoint the CLI reads (resume, validate, test) loads with weights_only=True, and every one
        # it writes is atomic: temp file beside it, fsync, rename (a kill mid-save never truncates last.ckpt)
        if type(trainer.strategy.checkpoint_io) in (TorchCheckpointIO, SafeCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint):  # save_last="link": an atomic symlink, not remove + link
                    cb._link_checkpoint = link_checkpoint
        # a GracefulStop / NonFiniteGuard of the config replaces the default one (defaults come last)
        seen: set[type] = set()
        keep = []
        for cb in trainer.callbacks:
            if type(cb) in (GracefulStop, NonFiniteGuard):
                if type(cb) in seen:
                    continue
                seen.add(type(cb))
            keep.append(cb)
        trainer.callbacks = keep
        return trainer


def _class_path(spec: Any) -> str | None:
    """The class path of an optimizer / scheduler spec, as a string (never imported)."""
    if spec is None:
        return None
    if hasattr(spec, "as_dict"):
        spec = spec.as_dict()
    if isinstance(spec, dict):
        return spec.get("class_path") if isinstance(spec.get("class_path"), str) else None
    if isinstance(spec, str):
        return spec
    try:
        return component_spec(spec)["class_path"]
    except ConfigError:
        return None


def _arch_of(cfg: Any) -> dict[str, Any]:
    model = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(cfg.model)
    return make_arch(model.get("config") or {}, *(model.get(k) for k in COMPONENTS))


def trainer_defaults() -> dict[str, Any]:
    from callbacks.graceful_stop import GracefulStop
    from callbacks.nonfinite import NonFiniteGuard

    return {
        "precision": "32-true",
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "callbacks": [
            # last.ckpt every validation, the best by val/loss. No save_on_exception: an exception can land
            # mid-step (the file would hold the weights of one step and the counters of another, or NaN
            # weights); GracefulStop saves Ctrl-C / SIGTERM at a step boundary and the final step instead.
            ModelCheckpoint(monitor="val/loss", save_top_k=1, save_last=True, filename="best-{step}"),
            LearningRateMonitor(logging_interval="step"),
            GracefulStop(),  # Ctrl-C / SIGTERM: finish the step, save last.ckpt, exit 130 / 143
            NonFiniteGuard(),  # NaN / inf loss or gradients: stop before the step is applied (one line, exit 2)
        ],
    }


def run_cli(args: list[str] | None = None, run: bool = True) -> HaipaiCLI:
    from datamodules import TextDataModule

    return HaipaiCLI(
        MoRLightningModule,
        TextDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        # parse errors raise (instead of printing the whole usage) so main() can print one line
        parser_kwargs={"description": "Haipai: train small language models with Mixture-of-Recursions.",
                       "exit_on_error": False},
        args=args,
        run=run,
    )
