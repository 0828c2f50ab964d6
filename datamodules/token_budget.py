"""Token-budget training data: (prompt, budget token, continuation, end token) examples from a corpus.

A model learns to end its continuation at a requested length (TALE-style budget-aware generation, arXiv
2412.18547, at this scale; the budget tokens are described in haipai_lightning/decode/token_budget.py) from
examples cut out of the corpus's own token stream:

    prompt (p tokens of text)  <|budget_L|>  continuation (the next L tokens of the same text)  <|endoftext|>

L is drawn from the trained budget ladder and p uniformly in [prompt_min, prompt_max], independently, so
the end token's position depends on the budget token alone (not on the absolute position: a model could
otherwise learn to stop at a fixed position). Spans crossing a document end are redrawn. Examples are
packed back to back into blocks of seq_len + 1 tokens like the plain LM data (no padding; a block's last
example is cut where the block ends). Labels are the next tokens everywhere -- the prompt keeps its LM loss,
the continuation's labels are "not yet" for the end token and the end token's label is the loss at the
end -- except the position before each budget token (-100): the budget is given, never predicted.
Block i is drawn from numpy's generator seeded by (seed, split, i), so it is the same in every epoch,
worker and resumed run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.text import TextDataModule
from haipai_lightning.config import ConfigError
from haipai_lightning.decode.token_budget import budget_ladder, budget_token_names, budget_tokens


def budget_block(tokens: np.ndarray, rng: np.random.Generator, seq_len: int, table: dict[int, int], eos: int,
                 prompt_min: int, prompt_max: int) -> dict[str, torch.Tensor]:
    """One packed block: input_ids, labels (seq_len,) long of budget examples drawn from `tokens` (a flat
    token stream whose documents end with `eos`)."""
    lengths = list(table)
    seq: list[int] = []
    masked: list[int] = []  # indices in seq of budget tokens (their preceding label is -100)
    while len(seq) < seq_len + 1:
        L = lengths[int(rng.integers(len(lengths)))]
        p = int(rng.integers(prompt_min, prompt_max + 1))
        for _ in range(8):  # a span inside one document (KJV chapters are far longer than a span)
            start = int(rng.integers(0, len(tokens) - p - L))
            span = tokens[start : start + p + L]
            if not (span == eos).any():
                break
        span = [int(t) for t in span]
        masked.append(len(seq) + p)
        seq += span[:p] + [table[L]] + span[p:] + [eos]
    s = torch.tensor(seq[: seq_len + 1], dtype=torch.long)
    labels = s[1:].clone()
    idx = torch.tensor([m - 1 for m in masked if 1 <= m <= seq_len], dtype=torch.long)
    labels[idx] = -100
    return {"input_ids": s[:-1], "labels": labels}


class TokenBudgetDataset(Dataset):
    """`n_blocks` packed budget blocks (budget_block) over a token array, block i seeded by (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, n_blocks: int, table: dict[int, int], eos: int,
                 prompt_min: int, prompt_max: int, seed: int) -> None:
        if len(tokens) <= prompt_max + max(table) + 1:
            raise ConfigError(f"the corpus has {len(tokens)} tokens, too few for prompts of {prompt_max} and "
                              f"continuations of {max(table)} tokens: lower data.budget_max / data.prompt_max")
        self.tokens, self.seq_len, self.n_blocks, self.table, self.eos = tokens, seq_len, n_blocks, table, eos
        self.prompt_min, self.prompt_max, self.seed = prompt_min, prompt_max, seed

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(i)))
        return budget_block(self.tokens, rng, self.seq_len, self.table, self.eos, self.prompt_min, self.prompt_max)


class TokenBudgetDataModule(TextDataModule):
    """TextDataModule whose blocks are token-budget examples (see the module docstring).

    The BPE is trained with vocab_size minus the number of budgets, and the budget tokens
    (`<|budget_L|>`, one per length of the ladder budget_min .. budget_max, ratio budget_ratio) are added
    after it, so the ids stay below data.vocab_size (= model.config.vocab_size); they travel in the
    checkpoint's tokenizer, where `haipai generate --token_budget` and `haipai serve` find them.

    Args (beyond TextDataModule's):
        budget_min: shortest trained continuation (tokens).
        budget_max: longest trained continuation (tokens).
        budget_ratio: ratio between neighbouring budgets of the ladder (> 1).
        prompt_min: shortest prompt before the budget token.
        prompt_max: longest prompt before the budget token.
    """

    def __init__(self, source: str = "kjv", seq_len: int = 256, batch_size: int = 16, vocab_size: int = 8192,
                 budget_min: int = 4, budget_max: int = 48, budget_ratio: float = 1.25, prompt_min: int = 4,
                 prompt_max: int = 32, **kw) -> None:
        if not 1 <= budget_min <= budget_max or budget_ratio <= 1 or not 1 <= prompt_min <= prompt_max:
            raise ConfigError(f"data: budget_min={budget_min} <= budget_max={budget_max} (both >= 1), budget_ratio="
                              f"{budget_ratio} > 1 and 1 <= prompt_min={prompt_min} <= prompt_max={prompt_max} needed")
        self.budget_lengths = budget_ladder(budget_min, budget_max, budget_ratio)
        super().__init__(source, seq_len, batch_size, vocab_size - len(self.budget_lengths), **kw)
        self.vocab_size_total = vocab_size
        self.prompt_min, self.prompt_max = prompt_min, prompt_max

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.tokenizer.add_special_tokens(budget_token_names(self.budget_lengths))
        table = budget_tokens(self.tokenizer)
        if max(table.values()) >= self.vocab_size_total:
            raise ConfigError(f"the budget tokens take ids up to {max(table.values())}, beyond data.vocab_size="
                              f"{self.vocab_size_total}: raise data.vocab_size (the tokenizer has "
                              f"{self.tokenizer.get_vocab_size()} tokens)")
        for k, split in enumerate(("train", "val")):
            ds = self.datasets[split]
            self.datasets[split] = TokenBudgetDataset(ds.tokens, self.seq_len, len(ds), table, self.eos_token_id,
                                                      self.prompt_min, self.prompt_max, self.seed * 2 + k)
