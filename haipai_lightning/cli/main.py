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
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from haipai_lightning.io.arch import COMPONENTS, arch_diff, make_arch
from haipai_lightning.io.checkpoint import SafeCheckpointIO
from haipai_lightning.config import ConfigError
from haipai_lightning.cli import eval as evaluate
from haipai_lightning.cli import export, generate, quantize, visualize
from haipai_lightning.train.module import MoRLightningModule

# `haipai fit --help` shows the attribute docstrings of ModelConfig's fields.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

class HaipaiCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # one source of truth: the BPE the data module trains sets the embedding size
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model's arguments by the checkpoint's hyperparameters.
        # An architecture the user asked for explicitly must not be dropped silently.
        sub = self.config.get("subcommand")
        before = _arch_of(self.config[sub]) if sub else None
        super()._parse_ckpt_path()
        if before is not None:
            diffs = arch_diff(_arch_of(self.config[sub]), before)
            if diffs:
                raise ConfigError(
                    "the checkpoint has another architecture: " + "; ".join(diffs[:4])
                    + " -- drop the conflicting options or start without --ckpt_path"
                )

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        # every checkpoint the CLI reads (resume, validate, test) loads with weights_only=True
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


def _arch_of(cfg: Any) -> dict[str, Any]:
    model = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(cfg.model)
    return make_arch(model.get("config") or {}, *(model.get(k) for k in COMPONENTS))


def trainer_defaults() -> dict[str, Any]:
    return {
        "precision": "32-true",
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "callbacks": [
            # last.ckpt every validation and on Ctrl-C / SIGTERM (save_on_exception), the best by val/loss
            ModelCheckpoint(monitor="val/loss", save_top_k=1, save_last=True, save_on_exception=True,
                            filename="best-{step}"),
            LearningRateMonitor(logging_interval="step"),
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
        # a user-fixable mistake: one line naming the field and the fix
        if os.environ.get("HAIPAI_DEBUG"):
            raise
        print(f"haipai: error: {e}", file=sys.stderr)
        sys.exit(2)


def _one_line(msg: str) -> str:
    """jsonargparse explains nested errors over several lines; keep the informative ones."""
    lines = [l.strip(" -") for l in msg.splitlines() if l.strip(" -")]
    return "; ".join(dict.fromkeys(lines))[:500]


if __name__ == "__main__":
    main()
