"""LMLM decoding (arXiv 2505.15962): a SQLite fact store and the hook that queries it mid-generation.

    FactStore    (entity, relation) -> value in one SQLite table; keys matched without case or
                 surrounding space (datamodules.lmlm.key). Editing a row changes what the model says
                 without changing a weight.
    LookupHook   a token hook (decode/hooks.py): when the model writes <|db_return|>, it reads the
                 entity and relation of the call it just wrote, looks them up, and forces
                 " value<|db_end|>"; generation then continues conditioned on the value.

SQLite (the standard library's sqlite3) because a fact table must be editable by any tool, be
safe under concurrent readers (haipai serve) and survive crashes; nothing here runs code from it.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

from datamodules.lmlm import END, ENTITY, MARKERS, RELATION, RETURN, Fact, check_tokenizer, key, render

UNKNOWN = "unknown"  # what a call for a fact the store lacks returns (the paper's behaviour: the model goes on)


class FactStore:
    """A SQLite table facts(entity_key, relation_key, entity, relation, value)."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        path = Path(path).expanduser()
        if not create and not path.is_file():
            raise FileNotFoundError(f"fact store {str(path)!r} does not exist; build one with FactStore.from_facts "
                                    "(or `haipai reformulate`-style tooling) or fix the --lookup path")
        # check_same_thread=False: haipai serve's engine thread reads a store opened in the main thread
        self.path, self.db = path, sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS facts (entity_key TEXT, relation_key TEXT, entity TEXT, "
                        "relation TEXT, value TEXT, PRIMARY KEY (entity_key, relation_key))")
        self.db.commit()

    @classmethod
    def from_facts(cls, path: str | Path, facts: Iterable[Fact]) -> "FactStore":
        store = cls(path, create=True)
        store.put_many(facts)
        return store

    def put_many(self, facts: Iterable[Fact]) -> None:
        rows = [(key(f.entity), key(f.relation), f.entity, f.relation, f.value) for f in facts]
        with self.db:  # one transaction: all or nothing
            self.db.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?, ?)", rows)

    def put(self, entity: str, relation: str, value: str) -> None:
        self.put_many([Fact(entity, relation, value)])

    def get(self, entity: str, relation: str) -> str | None:
        row = self.db.execute("SELECT value FROM facts WHERE entity_key = ? AND relation_key = ?",
                              (key(entity), key(relation))).fetchone()
        return None if row is None else row[0]

    def facts(self) -> list[Fact]:
        return [Fact(*r) for r in self.db.execute("SELECT entity, relation, value FROM facts ORDER BY rowid")]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM facts").fetchone()[0])

    def close(self) -> None:
        self.db.close()


class LookupHook:
    """Token hook: after <|db_return|>, force the store's value and <|db_end|> (decode/hooks.py).

    `tokenizer` is a `tokenizers.Tokenizer` with the four LMLM markers as special tokens.
    `calls` records every (entity, relation, value) looked up, for inspection.
    """

    def __init__(self, store: FactStore, tokenizer) -> None:
        self.store, self.tok = store, tokenizer
        ids = check_tokenizer(tokenizer)
        self.entity_id, self.relation_id = ids[ENTITY], ids[RELATION]
        self.return_id, self.end_id = ids[RETURN], ids[END]
        self.calls: deque[Fact] = deque(maxlen=10_000)  # the latest lookups (bounded: a server runs for long)

    def __call__(self, prompt: Sequence[int], generated: Sequence[int]) -> list[int]:
        last = generated[-1] if generated else (prompt[-1] if prompt else None)
        if last != self.return_id:
            return []
        seq = list(prompt) + list(generated)
        # the call just closed by <|db_return|>: ... <|db_entity|> E <|db_relationship|> R <|db_return|>
        ent = max((i for i, t in enumerate(seq) if t == self.entity_id), default=-1)
        rel = max((i for i, t in enumerate(seq) if t == self.relation_id), default=-1)
        if not 0 <= ent < rel < len(seq) - 1:  # a malformed call: close it with no value
            return [self.end_id]
        entity = self.tok.decode(seq[ent + 1 : rel]).strip()
        relation = self.tok.decode(seq[rel + 1 : -1]).strip()
        value = self.store.get(entity, relation)
        self.calls.append(Fact(entity, relation, value if value is not None else UNKNOWN))
        return self.tok.encode(" " + (value if value is not None else UNKNOWN), add_special_tokens=False).ids + [self.end_id]


def readable(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids as a reader sees them: calls replaced by their values, an unfinished call at the end
    hidden (so the text of a growing sequence only ever grows: what haipai serve streams), other
    special tokens dropped."""
    text = render(tokenizer.decode(list(ids), skip_special_tokens=False))
    cut = text.rfind(ENTITY)  # complete calls were rendered away: this one is still open
    text = text if cut < 0 else text[:cut]
    for m in MARKERS:
        text = text.replace(m, "")
    return text


class RenderingTokenizer:
    """A tokenizer whose decode() is `readable`: what haipai serve --lookup streams to its clients."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return readable(self.tok, ids)

    def __getattr__(self, name: str):  # encode, token_to_id, ...: the wrapped tokenizer's
        return getattr(self.tok, name)
