"""`haipai`: the LightningCLI (fit.py), the dispatcher (main.py) and one module per extra subcommand.

The flat layout's `haipai_lightning.cli` module held these names; they still resolve here (lazily, so
importing a subcommand module stays cheap). Its `main` function is now `haipai_lightning.cli.main.main`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("run_cli", "HaipaiCLI", "trainer_defaults"):
        from haipai_lightning.cli import fit

        return getattr(fit, name)
    if name == "generate_command":
        from haipai_lightning.cli.generate import generate_command

        return generate_command
    if name == "visualize_command":
        from haipai_lightning.cli.visualize import visualize_command

        return visualize_command
    raise AttributeError(f"module 'haipai_lightning.cli' has no attribute {name!r}")
