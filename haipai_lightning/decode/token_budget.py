"""Token budgets: reserved control tokens that tell a model how long its continuation should be.

TALE (Han et al., "Token-Budget-Aware LLM Reasoning", ACL Findings 2025, arXiv 2412.18547) puts the budget
in the prompt of a large model; at our scale the model learns it: a continuation of L tokens is trained
as `prompt, <|budget_L|>, continuation (L tokens), <|endoftext|>` (datamodules/token_budget.py), so the
end token is learnt at the budget. The budgets are a geometric ladder of lengths (ratio ~1.25: any budget
in range is within ~12% of a trained one) and each has its own special token, named by its length so a
checkpoint's tokenizer says which budgets it knows:

    <|budget_4|> <|budget_5|> <|budget_6|> <|budget_8|> <|budget_10|> ... <|budget_48|>

At generation (`haipai generate --token_budget N`, the engine's Request.token_budget, the server's
`token_budget` field) the prompt is followed by the token of the trained budget nearest to N (in log
length), and generation stops at the end token.
"""

from __future__ import annotations

import math
import re
from typing import Any

BUDGET_TOKEN = "<|budget_{}|>"
_BUDGET_RE = re.compile(r"^<\|budget_(\d+)\|>$")


def budget_ladder(min_budget: int = 4, max_budget: int = 48, ratio: float = 1.25) -> list[int]:
    """Geometric lengths min_budget .. max_budget (rounded, distinct, both ends included)."""
    out, x = [], float(min_budget)
    while x < max_budget / math.sqrt(ratio):  # the last step before max_budget is at least half a ratio
        if not out or round(x) != out[-1]:
            out.append(round(x))
        x *= ratio
    return [n for n in out if n < max_budget] + [max_budget]


def budget_token_names(lengths: list[int]) -> list[str]:
    return [BUDGET_TOKEN.format(n) for n in lengths]


def budget_tokens(tokenizer: Any) -> dict[int, int]:
    """{budget length: token id} of the budget tokens a `tokenizers.Tokenizer` holds ({} for none)."""
    if tokenizer is None:
        return {}
    out = {}
    for tok, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        m = _BUDGET_RE.match(tok)
        if m:
            out[int(m.group(1))] = idx
    return dict(sorted(out.items()))


def nearest_budget(table: dict[int, int], n: int) -> int:
    """The trained budget length nearest to n in log length (ties: the shorter)."""
    return min(table, key=lambda b: (abs(math.log(b) - math.log(n)), b))


def token_budget_error(n: Any, table: dict[int, int], max_new_tokens: int, limit: str = "max_new_tokens") -> str | None:
    """Why `n` is not a usable token budget for this model and max_new_tokens (None: it is); `limit` names
    the length cap as the caller's user knows it (`max_tokens` in the server)."""
    if not table:
        return ("this model knows no token budgets (its tokenizer has no <|budget_N|> tokens): train it with "
                "datamodules.TokenBudgetDataModule, or leave the token budget out")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max(table):
        return (f"must be an integer in [1, {max(table)}] (the model was trained with budgets "
                f"{min(table)}..{max(table)} tokens)")
    if n >= max_new_tokens:
        return f"leaves no room for the end token within {limit}={max_new_tokens}; raise {limit} above it"
    return None
