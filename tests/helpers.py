"""Shared test helpers (imported as `from helpers import ...`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def train_fixed_batch(model: torch.nn.Module, x: torch.Tensor, steps: int, lr: float = 3e-3, aux: bool = True,
                      after_first_backward: Callable[[], None] | None = None) -> list[float]:
    """AdamW steps on one batch x (B, T + 1): next-token loss (+ the model's aux losses when `aux`).

    Returns the LM loss of every step; `after_first_backward` can inspect the first gradients.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        out = model(x[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        (lm + sum(out.aux_losses.values()) if aux else lm).backward()
        if i == 0 and after_first_backward is not None:
            after_first_backward()
        opt.step()
        losses.append(lm.item())
    return losses


# The tiny model every unit test builds from: a 5-layer middle-cycle MoR with Nr=3 (1 prelude layer,
# 1 shared layer run 3 times, 1 coda layer), d_model 32, 4 query / 2 key-value heads. A test file
# names only what it changes (`cfg = partial(tiny_config, vocab_size=V, n_layers=8)`).
TINY = dict(vocab_size=128, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
            n_recursions=3, sharing="middle_cycle")


def tiny_config(**overrides):
    """ModelConfig of the shared tiny model with `overrides`."""
    from haipai_lightning.config import ModelConfig

    return ModelConfig(**{**TINY, **overrides})


def train_on_kjv(make_model: Callable[[], torch.nn.Module], steps: int, lr: float = 3e-3):
    """A small model trained briefly on King James Bible text (seq 64, batch 8, BPE 1024, 120 documents):
    seeds, builds the data, then `make_model()`, then `steps` AdamW steps on LM + aux losses.

    Returns (model in eval mode, the training batch iterator where it stopped, the data module)."""
    import os

    from datamodules import TextDataModule

    torch.manual_seed(0)
    dm = TextDataModule(source="kjv", seq_len=64, batch_size=8, vocab_size=1024, max_documents=120,
                        cache_dir=os.environ.get("HAIPAI_TEST_CACHE", ".haipai_cache"))
    dm.prepare_data()
    dm.setup("fit")
    m = make_model()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    it = iter(dm.train_dataloader())
    m.train()
    for _ in range(steps):
        b = next(it)
        out = m(b["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten()) + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), it, dm


def mixer_inputs(cfg, seed: int = 0, *, batch: int, length: int):
    """Random mixer input x (batch, length, d_model) and RoPE cos / sin for positions 0..length-1."""
    from haipai_lightning.model.rope import RotaryEmbedding

    torch.manual_seed(seed)
    x = torch.randn(batch, length, cfg.d_model)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)(torch.arange(length))
    return x, cos, sin


def attention_twin(mixer, cfg):
    """A plain `Attention` holding `mixer`'s shared weights (wq, wk, wv, wo): the standard case an attention
    variant must reduce to."""
    from haipai_lightning.model.mixers.attention import Attention

    ref = Attention(cfg)
    ref.load_state_dict(mixer.state_dict(), strict=False)
    return ref

