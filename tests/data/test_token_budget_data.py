"""Token-budget examples (datamodules/token_budget.py): prompt, budget token, L tokens of the same text, end token;
the budget's label masked; deterministic blocks; the data module's budget tokens inside the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.token_budget import TokenBudgetDataModule, TokenBudgetDataset, budget_block
from haipai_lightning.config import ConfigError
from haipai_lightning.decode.token_budget import budget_tokens

EOS = 0
TABLE = {4: 901, 6: 902, 9: 903}


def test_a_block_is_prompt_budget_continuation_end_with_the_budget_label_masked():
    tokens = np.arange(1, 5001, dtype=np.int64) % 800 + 1  # one long document: consecutive ids, no end token
    b = budget_block(tokens, np.random.default_rng(0), 96, TABLE, EOS, 3, 10)
    s = b["input_ids"]  # (96,)
    inv = {v: k for k, v in TABLE.items()}
    starts = [i for i, t in enumerate(s.tolist()) if t in inv]
    assert len(starts) >= 3
    for i in starts:
        L = inv[int(s[i])]
        assert b["labels"][i - 1] == -100  # the budget token is given, never predicted
        prev = int(s[i - 1])
        cont = s[i + 1 : i + 1 + L].tolist()
        assert cont == [(prev + j) % 800 + 1 for j in range(len(cont))]  # the next L tokens of the prompt's text
        if i + 1 + L < len(s):
            assert int(s[i + 1 + L]) == EOS  # the end token right at the budget
    masked = (b["labels"] == -100).nonzero().flatten().tolist()
    assert masked == [i - 1 for i in starts if 1 <= i <= 96]
    keep = b["labels"] != -100
    assert torch.equal(b["labels"][:-1][keep[:-1]], b["input_ids"][1:][keep[:-1]])  # otherwise next-token labels
    gaps = [j - i for i, j in zip(starts, starts[1:])]
    assert len(set(gaps)) > 1  # prompt lengths vary: the end is not at a fixed absolute position


def test_blocks_are_deterministic_per_index():
    tokens = np.arange(1, 3001, dtype=np.int64) % 700 + 1
    a = TokenBudgetDataset(tokens, 48, 10, TABLE, EOS, 3, 8, seed=5)
    b = TokenBudgetDataset(tokens, 48, 10, TABLE, EOS, 3, 8, seed=5)
    assert torch.equal(a[3]["input_ids"], b[3]["input_ids"]) and not torch.equal(a[3]["input_ids"], a[4]["input_ids"])
    with pytest.raises(ConfigError, match="budget_max"):
        TokenBudgetDataset(tokens[:15], 48, 10, TABLE, EOS, 3, 8, seed=5)


def test_the_data_module_puts_its_budget_tokens_inside_the_vocabulary(tmp_path):
    text = "\n\n".join(f"Paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 23} and more text" for j in range(40))
                       for i in range(12))
    (tmp_path / "c.txt").write_text(text)
    dm = TokenBudgetDataModule(source=str(tmp_path / "c.txt"), seq_len=32, batch_size=2, vocab_size=320,
                               budget_min=4, budget_max=16, prompt_min=2, prompt_max=6, val_fraction=0.2,
                               cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    table = budget_tokens(dm.tokenizer)
    assert list(table) == dm.budget_lengths == [4, 5, 6, 8, 10, 12, 16]
    assert max(table.values()) < 320 and dm.tokenizer.get_vocab_size() <= 320
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and (batch["labels"] == -100).any()
    assert any(t in table.values() for t in batch["input_ids"].flatten().tolist())
    with pytest.raises(ConfigError, match="budget_min"):
        TokenBudgetDataModule(budget_min=10, budget_max=5)
