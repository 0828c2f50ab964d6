"""`haipai`: LightningCLI (fit / validate / test / predict) plus the extra subcommands of this folder.

Every field of the module, the data module and the trainer is a typed, documented
argument (`haipai fit --help`); components are swapped with `class_path` /
`init_args` in YAML.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from haipai_lightning.io.arch import COMPONENTS, arch_diff, make_arch
from haipai_lightning.io.checkpoint import AtomicCheckpointIO, SafeCheckpointIO, link_checkpoint, load_checkpoint_file
from haipai_lightning.io.loader import checkpoint_meta
from haipai_lightning.io.spec import component_spec
from haipai_lightning.config import ConfigError
from haipai_lightning.cli import eval as evaluate
from haipai_lightning.cli import export, generate, quantize, serve, visualize
from haipai_lightning.train.module import MoRLightningModule

# `haipai fit --help` shows the attribute docstrings of ModelConfig's fields.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

class HaipaiCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # one source of truth: the BPE the data module trains sets the embedding size
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")

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


def _subcommands() -> dict[str, Callable[..., Any]]:
    """`haipai NAME ...` commands beside LightningCLI's fit/validate/test/predict.

    Each is a plain function in its own module whose signature jsonargparse turns into flags; add
    one line here to add a command. The modules import their heavy dependencies (lm_eval, the
    engine) inside the function, so `haipai fit` starts fast.
    """
    return {
        "generate": generate.generate_command,
        "visualize": visualize.visualize_command,
        "eval": evaluate.eval_command,
        "quantize": quantize.quantize_command,
        "export": export.export_command,
        "serve": serve.serve_command,
    }


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        commands = _subcommands()
        if argv and argv[0] in commands:
            fn = commands[argv[0]]
            parser = ArgumentParser(prog=f"haipai {argv[0]}", description=(fn.__doc__ or "").splitlines()[0])
            parser.add_function_arguments(fn, as_positional=False)
            cfg = parser.parse_args(argv[1:])
            fn(**cfg.as_dict())
        else:
            run_cli(None if args is None else argv)
    except ArgumentError as e:
        print(f"haipai: error: {_one_line(str(e))} (see `haipai {argv[0] if argv else ''} --help`)", file=sys.stderr)
        sys.exit(2)
    except (ConfigError, FileNotFoundError) as e:
        # a user-fixable mistake (or a diverged run, TrainingDiverged): one line naming the field and the fix
        if os.environ.get("HAIPAI_DEBUG"):
            raise
        print(f"haipai: error: {e}", file=sys.stderr)
        sys.exit(2)
    except MisconfigurationException as e:  # Lightning's own checks of trainer arguments (e.g. max_steps -5)
        if os.environ.get("HAIPAI_DEBUG"):
            raise
        print(f"haipai: error: {_one_line(str(e))} (see `haipai {argv[0] if argv else ''} --help`)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside a fit (parsing, a subcommand): the shell's code, no traceback
        print("haipai: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        # Lightning ends a Ctrl-C it caught with sys.exit(1) and a SIGTERM with SIGTERMException (code None:
        # exit 0, as if the run had finished); GracefulStop sets 130 / 143 itself during training.
        if isinstance(e, SIGTERMException) and not e.code:
            sys.exit(143)
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):
            sys.exit(130)
        raise


def _one_line(msg: str) -> str:
    """jsonargparse explains nested errors over several lines; keep the informative ones."""
    lines = [l.strip(" -") for l in msg.splitlines() if l.strip(" -")]
    return "; ".join(dict.fromkeys(lines))[:500]


if __name__ == "__main__":
    main()
