"""`haipai`: LightningCLI (fit / validate / test / predict) plus `haipai generate`.

Every field of the module, the data module and the trainer is a typed, documented
argument (`haipai fit --help`); components are swapped with `class_path` /
`init_args` in YAML.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from haipai_lightning.checkpoint import SafeCheckpointIO
from haipai_lightning.config import ConfigError
from haipai_lightning.module import MoRLightningModule

# `haipai fit --help` shows the attribute docstrings of ModelConfig's fields.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

EXTRA_COMMANDS = ("generate",)


class HaipaiCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # one source of truth: the BPE the data module trains sets the embedding size
        parser.link_arguments("data.vocab_size", "model.config.vocab_size")


def trainer_defaults() -> dict[str, Any]:
    return {
        "precision": "32-true",
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
        "plugins": [SafeCheckpointIO()],
        "callbacks": [
            # last.ckpt every validation and on Ctrl-C / SIGTERM (save_on_exception), the best by val/loss
            ModelCheckpoint(monitor="val/loss", save_top_k=1, save_last=True, save_on_exception=True,
                            filename="best-{step}"),
            LearningRateMonitor(logging_interval="step"),
        ],
    }


def run_cli(args: list[str] | None = None) -> HaipaiCLI:
    from datamodules import TextDataModule

    return HaipaiCLI(
        MoRLightningModule,
        TextDataModule,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Haipai: train small language models with Mixture-of-Recursions."},
        args=args,
    )


def generate_command(
    ckpt_path: str,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
) -> str:
    """Sample text from a trained checkpoint (with a KV cache).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        prompt: text to continue ("" starts from the end-of-text token).
        max_new_tokens: tokens to sample.
        temperature: softmax temperature; 0 = greedy.
        top_k: keep the k most likely tokens (null = all).
        top_p: nucleus sampling mass (null or 1 = off).
        seed: random seed (null = nondeterministic).
    """
    import torch

    from haipai_lightning.generation import SamplingConfig, generate, load_model

    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    ids = tok.encode(prompt).ids if prompt else [tok.token_to_id("<|endoftext|>") or 0]
    s = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
    out = generate(model, torch.tensor([ids]), s)
    text = tok.decode(out[0].tolist())
    print(text)
    return text


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] == "generate":
            from jsonargparse import auto_cli

            auto_cli(generate_command, args=argv[1:])
        else:
            run_cli(argv)
    except (ConfigError, FileNotFoundError) as e:
        # a user-fixable mistake: one line naming the field and the fix
        if os.environ.get("HAIPAI_DEBUG"):
            raise
        print(f"haipai: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
