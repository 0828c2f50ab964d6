"""Perplexity of a model on text: exp of the mean next-token negative log-likelihood.

The token stream is cut the way training packs it (`datamodules.text.PackedDataset`):
block i reads tokens[i*L : i*L + L] and predicts tokens[i*L + 1 : i*L + L + 1], so every
token after the first is predicted exactly once, with the context since its block began;
the tail shorter than L is scored too (training drops it). On the checkpoint's own
validation split the full blocks give the `val/loss` Lightning logs.

The model runs in eval mode: MoR routers route causally (expert-choice by its 0.5
threshold), so a token's score does not depend on what follows it or on its batch-mates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from haipai_lightning.config import ConfigError


@dataclass
class PerplexityResult:
    nll: float  # mean NLL per predicted token (nats)
    ppl: float  # exp(nll)
    tokens: int  # predicted tokens
    bits_per_byte: float | None = None  # total NLL / (ln 2 * UTF-8 bytes): comparable across tokenizers
    source: str = ""
    split: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blocks(n: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, length) of the input blocks over a stream of n tokens: length <= seq_len, n - 1 predictions."""
    return [(s, min(seq_len, n - 1 - s)) for s in range(0, n - 1, seq_len)]


@torch.inference_mode()
def token_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 8) -> torch.Tensor:
    """ids (N,) int64 -> (N - 1,) float32: NLL of ids[t] given its block's tokens before t (nats)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"--seq_len {seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}; lower it")
    was_training = model.training
    model.eval()
    out = torch.empty(ids.numel() - 1)
    blocks = _blocks(ids.numel(), seq_len)
    full = [s for s, n in blocks if n == seq_len]
    for i in range(0, len(full), batch_size):  # full blocks, batched
        starts = torch.tensor(full[i : i + batch_size])
        idx = starts[:, None] + torch.arange(seq_len + 1)[None]  # (b, L + 1)
        chunk = ids[idx]
        logits = model(chunk[:, :-1]).logits.float()  # (b, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")  # (b, L)
        out[idx[:, :-1].flatten()] = nll.flatten()
    for s, n in blocks:  # the tail (at most one block shorter than seq_len)
        if n < seq_len:
            logits = model(ids[None, s : s + n]).logits.float()[0]  # (n, V)
            out[s : s + n] = F.cross_entropy(logits, ids[s + 1 : s + n + 1], reduction="none")
    model.train(was_training)
    return out


def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 8,
               n_bytes: int | None = None, compress=None, compress_tail: int = 32) -> PerplexityResult:
    """Perplexity = exp(mean token NLL) over the whole stream `ids` (N,).

    compress: a `compress.config.CompressConfig` (issue #21): each block's first seq_len - compress_tail
    tokens are a compressed context and only its last compress_tail + 1 tokens are scored (bits per byte
    is then left out: the scored tokens are not the whole text)."""
    if compress is not None:
        from haipai_lightning.compress.prefill import compressed_token_nll

        nll = compressed_token_nll(model, ids, seq_len, compress, compress_tail).double()
        mean = float(nll.mean())
        return PerplexityResult(nll=mean, ppl=math.exp(mean), tokens=int(nll.numel()))
    nll = token_nll(model, ids, seq_len, batch_size).double()
    mean = float(nll.mean())
    bpb = float(nll.sum()) / (math.log(2) * n_bytes) if n_bytes else None
    return PerplexityResult(nll=mean, ppl=math.exp(mean), tokens=int(nll.numel()), bits_per_byte=bpb)


def eval_documents(source: str | None, split: str | None, data_hparams: dict[str, Any] | None) -> tuple[list[str], str, str]:
    """The documents to score, their source and split.

    source None: the checkpoint's training corpus (its data module's hyperparameters; `kjv`
    without them) and, by default, its held-out validation documents -- the same split the
    data module made (`split_documents` with the same seed and fraction). A source given
    by the user: all of its documents unless split="val".
    """
    from datamodules.corpus import load_documents
    from datamodules.text import split_documents

    hp = dict(data_hparams or {})
    if split not in (None, "val", "all"):
        raise ConfigError(f"--split {split!r}: use val (the held-out documents) or all")
    src = source or hp.get("source", "kjv")
    split = split or ("val" if source is None else "all")
    docs = load_documents(src, hp.get("text_field", "text") if source is None else "text")
    if hp.get("max_documents") is not None and source is None:
        docs = docs[: hp["max_documents"]]
    if not docs:
        raise ConfigError(f"--data {src!r} holds no text")
    if split == "val":
        if len(docs) < 2:
            raise ConfigError(f"--data {src!r} has one document, nothing is held out; pass --split all")
        _, val = split_documents(len(docs), hp.get("val_fraction", 0.02), hp.get("seed", 1234))
        docs = [docs[i] for i in val]
    return docs, src, split


def encode_documents(tokenizer: Any, docs: list[str]) -> tuple[np.ndarray, int]:
    """Documents -> one token stream, each followed by <|endoftext|> (as training packs them); and its UTF-8 bytes."""
    from datamodules.tokenizer import eos_id

    eos = eos_id(tokenizer)
    encs = tokenizer.encode_batch(docs, add_special_tokens=False)
    ids = np.fromiter((t for e in encs for t in (*e.ids, eos)), dtype=np.int64)
    return ids, sum(len(d.encode("utf-8")) for d in docs)
