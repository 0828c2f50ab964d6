"""`haipai`: LightningCLI (fit / validate / test / predict) plus `haipai generate` and `haipai visualize`.

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

from haipai_lightning.checkpoint import SafeCheckpointIO, arch_diff, component_spec
from haipai_lightning.config import ConfigError
from haipai_lightning.depth_picture import DEFAULT_TEXT
from haipai_lightning.module import MoRLightningModule

# `haipai fit --help` shows the attribute docstrings of ModelConfig's fields.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

EXTRA_COMMANDS = ("generate", "visualize")


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
    arch = {k: component_spec(model.get(k)) for k in ("mixer", "mlp", "router")}
    arch["config"] = model.get("config") or {}
    return arch


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


def generate_command(
    ckpt_path: str,
    prompt: str = "",
    prompts: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    depth_budget: float | None = None,
    speculative: int = 0,
    draft_depth: int = 1,
) -> list[str]:
    """Sample text from a trained checkpoint (KV-cached; MoR models route causally).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        prompt: text to continue ("" starts from the end-of-text token).
        prompts: a text file with one prompt per line: batch generation through the
            continuous depth-wise batching engine.
        batch_size: requests in flight at once in the engine.
        max_new_tokens: tokens to sample per prompt.
        temperature: softmax temperature; 0 = greedy.
        top_k: keep the k most likely tokens (null = all).
        top_p: nucleus sampling mass (null or 1 = off).
        seed: random seed (null = nondeterministic); request i of a prompts file uses seed + i.
        depth_budget: cap on the mean recursion depth of the generated tokens (1..Nr; engine).
        speculative: greedy speculative decoding with this many drafted tokens per round (0 = off).
        draft_depth: recursion steps of the draft (the same model stopped early).
    """
    import torch

    from haipai_lightning.engine import Engine, Request
    from haipai_lightning.generation import SamplingConfig, generate, load_model, speculative_generate

    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    eos = tok.token_to_id("<|endoftext|>") or 0
    if prompts is not None:
        if not os.path.isfile(prompts):
            raise FileNotFoundError(f"--prompts {prompts!r} does not exist; give a text file with one prompt per line")
        with open(prompts, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    else:
        lines = [prompt]
    encoded = [tok.encode(t).ids or [eos] for t in lines]
    if speculative > 0:
        if prompts is not None or temperature > 0:
            raise ConfigError("--speculative decodes one --prompt greedily: pass --temperature 0 and no --prompts")
        out, stats = speculative_generate(model, torch.tensor([encoded[0]]), max_new_tokens, k=speculative,
                                          draft_depth=draft_depth)
        texts = [tok.decode(out[0].tolist())]
        print(texts[0])
        print(f"[speculative: {stats['tokens_per_round']:.2f} tokens per full-model pass, "
              f"acceptance {stats['acceptance']:.2f}]", file=sys.stderr)
        return texts
    if prompts is None and depth_budget is None:
        s = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed)
        texts = [tok.decode(generate(model, torch.tensor([encoded[0]]), s)[0].tolist())]
        print(texts[0])
        return texts
    engine = Engine(model, max_batch=batch_size, max_len=model.cfg.max_seq_len)
    reqs = [engine.submit(Request(ids, max_new_tokens, SamplingConfig(
        max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i), depth_budget))
        for i, ids in enumerate(encoded)]
    engine.run()
    texts = [tok.decode(r.prompt + r.output) for r in reqs]
    for r, text in zip(reqs, texts):
        depth = sum(r.depths) / max(len(r.depths), 1)
        print(text)
        print(f"[mean recursion depth {depth:.2f}]", file=sys.stderr)
        if prompts is not None:
            print("---")
    return texts


def visualize_command(
    ckpt_path: str,
    text: str = DEFAULT_TEXT,
    out: str = ".",
) -> list[str]:
    """Draw a text with every token coloured by its recursion depth (PNG + HTML).

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        text: the text to route (truncated to the model's max_seq_len tokens).
        out: directory for depth.png / depth.html (one pair per router group: mod.png for Mixture-of-Depths).
    """
    from haipai_lightning.depth_picture import write_depth_pictures
    from haipai_lightning.generation import load_model

    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    written = write_depth_pictures(model, tok, text, out)
    if not written:
        raise ConfigError(f"{ckpt_path!r} routes no tokens (model.router is FullRecursion, no MoD): "
                          "every token has the same depth, there is nothing to draw")
    paths = [str(p) for png, page, _ in written.values() for p in (png, page)]
    print("\n".join(paths))
    return paths


def _subcommands() -> dict[str, Callable[..., Any]]:
    """`haipai NAME ...` commands beside LightningCLI's fit/validate/test/predict.

    Each is a plain function whose signature jsonargparse turns into flags; add one
    line here to add a command (imports stay lazy so `haipai fit` starts fast).
    """
    return {
        "generate": generate_command,
        "visualize": visualize_command,
        "eval": __import__("haipai_lightning.eval_command", fromlist=["_"]).eval_command,  # lm_eval stays lazy
        "quantize": __import__("haipai_lightning.quant_commands", fromlist=["_"]).quantize_command,
        "export": __import__("haipai_lightning.quant_commands", fromlist=["_"]).export_command,
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
