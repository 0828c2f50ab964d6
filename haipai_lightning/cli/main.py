"""`haipai`: dispatches to the LightningCLI (fit / validate / test / predict, cli/fit.py) or to one of the
extra subcommands of this folder (one module each), and turns every user mistake into one line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings

from haipai_lightning.cli import eval as evaluate
from haipai_lightning.cli import export, generate, prepare, quantize, serve, visualize
from haipai_lightning.cli import reformulate
from haipai_lightning.config import ConfigError

# `haipai fit --help` shows the attribute docstrings of ModelConfig's fields.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def run_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """The LightningCLI (imported here, not at module level: the other subcommands do not need Lightning)."""
    from haipai_lightning.cli.fit import run_cli as fit_cli

    return fit_cli(args, run)


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
        "prepare": prepare.prepare_command,
        "reformulate": reformulate.reformulate_command,
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
    except Exception as e:
        if not _is_lightning("lightning.fabric.utilities.exceptions", "MisconfigurationException", e):
            raise
        # Lightning's own checks of trainer arguments (e.g. max_steps -5)
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
        if _is_lightning("lightning.pytorch.utilities.exceptions", "SIGTERMException", e) and not e.code:
            sys.exit(143)
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):
            sys.exit(130)
        raise


def _is_lightning(module: str, name: str, e: BaseException) -> bool:
    """isinstance(e, module.name) for a Lightning exception class, without importing Lightning: if the
    module was never imported, nothing could have raised its exception."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(e, cls)


def _one_line(msg: str) -> str:
    """jsonargparse explains nested errors over several lines; keep the informative ones."""
    lines = [l.strip(" -") for l in msg.splitlines() if l.strip(" -")]
    return "; ".join(dict.fromkeys(lines))[:500]


if __name__ == "__main__":
    main()
