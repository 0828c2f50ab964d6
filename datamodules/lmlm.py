"""Limited-Memory LM data (LMLM, Zhao et al., arXiv 2505.15962): facts are looked up, not memorised.

Training text carries each entity-level fact as a lookup call and the value the store returned:

    Ada Byron was born in<|db_entity|> Ada Byron<|db_relationship|> birthplace<|db_return|> Leeds<|db_end|>.

The four markers are special tokens of the tokenizer (one id each). The model is trained to write
the call (entity and relation, text it can see or infer) but the returned value and the closing
marker are masked out of the loss (labels -100): at generation the decoding hook
(haipai_lightning/decode/lookup.py) inserts them from the fact store, so the weights never have to
memorise them -- the paper's point: knowledge that lives in a table can be inspected and edited.

`render` turns annotated text into what a reader sees (each call replaced by its value); a plain
baseline trains on that same rendered text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from datamodules.packed import PackedDataset

ENTITY, RELATION, RETURN, END = "<|db_entity|>", "<|db_relationship|>", "<|db_return|>", "<|db_end|>"
MARKERS = (ENTITY, RELATION, RETURN, END)
_CALL = re.compile(re.escape(ENTITY) + r"(.*?)" + re.escape(RELATION) + r"(.*?)" + re.escape(RETURN) + r"(.*?)"
                   + re.escape(END), re.S)


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


def key(text: str) -> str:
    """How entities and relations are matched: surrounding space and case ignored."""
    return " ".join(text.split()).casefold()


def call(entity: str, relation: str, value: str) -> str:
    """The annotation of one fact, markers included (a space before each field, as in running text)."""
    return f"{ENTITY} {entity}{RELATION} {relation}{RETURN} {value}{END}"


def facts(text: str) -> list[Fact]:
    """Every lookup call in `text`, in order."""
    return [Fact(e.strip(), r.strip(), v.strip()) for e, r, v in _CALL.findall(text)]


def render(text: str) -> str:
    """Annotated text as a reader sees it: each call replaced by its returned value (with its leading space)."""
    return _CALL.sub(lambda m: m.group(3), text)


def check_tokenizer(tok) -> dict[str, int]:
    """The marker ids of a tokenizer that has all four as single tokens, else a one-line error."""
    from haipai_lightning.config import ConfigError

    ids = {m: tok.token_to_id(m) for m in MARKERS}
    missing = [m for m, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"the tokenizer lacks the LMLM markers {missing}; train it with data.lmlm=true (or add them "
                          "as special tokens to data.tokenizer_path's tokenizer.json)")
    return ids


def value_mask(tokens: np.ndarray, return_id: int, end_id: int) -> np.ndarray:
    """(N,) bool: True at the tokens a lookup returns -- every token after a <|db_return|> up to and
    including its <|db_end|>. Vectorised: a token is inside when the last return/end marker at or
    before it is a return marker (and it is not that marker), or it is an end marker."""
    tokens = np.asarray(tokens)
    is_ret, is_end = tokens == return_id, tokens == end_id
    idx = np.arange(len(tokens))
    last_ret = np.maximum.accumulate(np.where(is_ret, idx, -1))
    last_end = np.maximum.accumulate(np.where(is_end, idx, -1))
    return ((last_ret > last_end) & ~is_ret) | is_end


class LMLMPackedDataset(PackedDataset):
    """PackedDataset whose labels are -100 where the target is a looked-up value (or its <|db_end|>).

    The mask is computed once for the whole flat array (a value span may start in the previous block)."""

    def __init__(self, path, seq_len: int, return_id: int, end_id: int):
        super().__init__(path, seq_len)
        self.return_id, self.end_id = return_id, end_id
        self.mask = value_mask(self.tokens, return_id, end_id)  # (N,) over the flat token array

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        start = i * self.seq_len
        masked = torch.from_numpy(self.mask[start + 1 : start + self.seq_len + 1].copy())  # (T,) aligned with labels
        item["labels"] = item["labels"].masked_fill(masked, -100)
        return item
