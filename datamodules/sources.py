"""Documents of any source, one at a time, in a fixed order (what `haipai prepare` tokenizes).

Sources: the bundled KJV, local .txt/.jsonl/.json/.parquet files, folders and globs, and Hugging Face
Hub datasets read with ``streaming=True`` (local .parquet/.json go through the same reader). Nothing
but the current document (and the reader's buffer) is held, so any corpus size fits in memory.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from datamodules.corpus import KJV, SUFFIXES, TXT_DOC_CHARS, load_kjv, looks_like_path
from haipai_lightning.config import ConfigError


def resolve_sources(source: str) -> list[tuple[str, str]]:
    """``"kjv,data/*.jsonl,org/name"`` -> [(kind, what)]; kinds: kjv, file, hub. Files sorted per part."""
    parts = [source] if os.path.exists(os.path.expanduser(source)) else [s.strip() for s in source.split(",")]
    out: list[tuple[str, str]] = []
    for part in filter(None, parts):
        if part == KJV:
            out.append(("kjv", part))
        elif any(c in part for c in "*?["):
            files = sorted(f for f in glob.glob(os.path.expanduser(part), recursive=True) if f.lower().endswith(SUFFIXES))
            if not files:
                raise ConfigError(f"--source {part!r} matches no .txt/.jsonl/.json/.parquet file")
            out += [("file", f) for f in files]
        elif looks_like_path(part):
            p = Path(part).expanduser()
            if not p.exists():
                raise ConfigError(f"--source {part!r} does not exist; give a .txt/.jsonl/.parquet file, folder or glob")
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES) if p.is_dir() else [p]
            if not files:
                raise ConfigError(f"--source {part!r} holds no .txt/.jsonl/.json/.parquet file")
            out += [("file", str(f)) for f in files]
        else:
            out.append(("hub", part))
    if not out:
        raise ConfigError("--source is empty; use kjv, a local file/folder/glob or a Hub dataset name")
    return out


def _txt_docs(path: str) -> Iterator[str]:
    """Blank-line paragraphs merged up to TXT_DOC_CHARS (as corpus._split_paragraphs), read line by line."""
    current, para = "", []
    with open(path, encoding="utf-8") as f:
        try:
            for line in [*f, ""]:
                if line.strip():
                    para.append(line)
                    continue
                p = "".join(para).strip()
                para = []
                if not p:
                    continue
                if current and len(current) + len(p) + 2 > TXT_DOC_CHARS:
                    yield current
                    current = p
                else:
                    current = f"{current}\n\n{p}" if current else p
        except UnicodeDecodeError as e:
            raise ConfigError(f"--source file {path!r} is not UTF-8 text ({e.reason}); convert it or leave it out") from None
    if current:
        yield current


def _check(where: str, text_field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {text_field!r} holds {type(value).__name__}, not text; set --text_field")
    return value


def _jsonl_docs(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}:{lineno} is not a valid UTF-8 JSON line ({e})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ConfigError(f"{path}:{lineno} has no field {text_field!r}; set --text_field to the key of the text")
            yield _check(f"{path}:{lineno}", text_field, record[text_field])


def _hf_stream_docs(name: str, text_field: str, split: str, data_files: str | None = None,
                    config: str | None = None) -> Iterator[str]:
    """A Hub dataset, or local .parquet/.json through the same ``streaming=True`` reader."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, data_files=data_files, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # offline, typo, gated: one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--source {data_files or name!r}: reading it with datasets (streaming) failed ({msg})") from e
    if first is None:
        return
    if text_field not in first:
        raise ConfigError(f"--source {data_files or name!r} has no column {text_field!r} (columns: {sorted(first)}); "
                          f"set --text_field to the column that holds the text")
    for i, row in enumerate(_chain(first, rows)):
        yield _check(f"{data_files or name} row {i}", text_field, row[text_field])


def _chain(first, rows):
    yield first
    yield from rows


def iter_documents(source: str, text_field: str = "text", split: str = "train",
                   hub_config: str | None = None) -> Iterator[str]:
    """Every non-empty document of ``source``, in a fixed order, one at a time (nothing held)."""
    for kind, what in resolve_sources(source):
        if kind == "kjv":
            docs: Iterator[str] = iter(load_kjv())  # 4 MB bundled: the only source read whole
        elif kind == "hub":
            docs = _hf_stream_docs(what, text_field, split, config=hub_config)
        elif what.lower().endswith(".txt"):
            docs = _txt_docs(what)
        elif what.lower().endswith(".jsonl"):
            docs = _jsonl_docs(what, text_field)
        else:  # .parquet / .json
            docs = _hf_stream_docs("parquet" if what.lower().endswith(".parquet") else "json", text_field, "train",
                                   data_files=what)
        yield from (d for d in docs if d.strip())
