"""FitSummary: at the end of `fit`, print validation loss against the corpus's unigram entropy, and a sample."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate


class FitSummary(L.Callback):
    """Prints what a quick run learned.

    The unigram entropy is the loss of the best model that ignores context (it predicts
    each token by its corpus frequency); a validation loss clearly below it means the
    model uses context.
    """

    def __init__(self, prompt: str = "And God said", max_new_tokens: int = 60, temperature: float = 0.8,
                 seed: int = 0) -> None:
        """Args:
            prompt: text the sample continues.
            max_new_tokens: length of the sample.
            temperature: sampling temperature (0 = greedy).
            seed: sampling seed.
        """
        self.prompt, self.max_new_tokens, self.temperature, self.seed = prompt, max_new_tokens, temperature, seed
        self.summary: dict[str, float] = {}

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        val = trainer.callback_metrics.get("val/loss")
        h = getattr(dm, "unigram_entropy", None)
        if val is not None:
            v = float(val)
            self.summary["val_loss"] = v
            if not math.isfinite(v):
                line = f"validation loss {v} (the model diverged)"
            else:
                line = f"validation loss {v:.3f} nats (perplexity {math.exp(min(v, 700.0)):.1f})"
                if h is not None:
                    self.summary["unigram_entropy"] = float(h)
                    line += f" vs unigram entropy {h:.3f} nats: {h - v:+.3f} nats from context"
            print(line)
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            return
        model = pl_module.model
        ids = torch.tensor([tok.encode(self.prompt).ids], device=pl_module.device)
        broken = _non_finite(model, ids)
        if broken:
            print(f"sample: skipped, {broken} (the run diverged: lower the learning rate or clip gradients)")
            return
        n = min(self.max_new_tokens, model.cfg.max_seq_len - ids.size(1))
        was_training = model.training
        out = generate(model, ids, SamplingConfig(max_new_tokens=n, temperature=self.temperature, seed=self.seed))
        model.train(was_training)
        print("sample:", tok.decode(out[0].tolist()))


def _non_finite(model: torch.nn.Module, ids: torch.Tensor) -> str | None:
    """Why the model cannot be sampled from (NaN / inf weights or logits), or None."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return f"the model has non-finite weights ({len(bad)} tensors, e.g. {bad[0]})"
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(ids[:, -model.cfg.max_seq_len:]).logits
    model.train(was_training)
    return None if torch.isfinite(logits).all() else "the model's logits are not finite"
