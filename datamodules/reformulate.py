"""Massive Genre-Audience reformulation (MGA, Hao et al., arXiv 2502.04235): every document rewritten k ways.

For each document a generator proposes k (genre, audience) pairs, and a rewriter rewrites the
document once per pair (MGA section 2: the same small LM plays both roles here, with two prompts).
The prompts are text files a user edits (datamodules/prompts/: `{document}`, `{k}`, `{genre}`,
`{audience}` are replaced literally; nothing in them is evaluated). When the generator's answer
holds fewer than k well-formed `genre: ... | audience: ...` lines (small models often fail), the
rest are drawn from a fallback list (a file too) with a seed of the document, and marked so.

Output: one JSON line per reformulation, k per document, in document order, with provenance:

    {"text": ..., "source": ..., "source_id": 12, "source_sha256": "...", "variant": 0,
     "genre": ..., "audience": ..., "pair_source": "model" | "fallback", "model": ...}

It is a `.jsonl` data source like any other: `TextDataModule(source="kjv,out.jsonl")`, or
`haipai prepare` it with the original's tokenizer and mix it at a weight with
`StreamingDataModule(prepared=[orig, mga], weights=[0.6, 0.4])`.

Resumable: a batch of documents is appended with one write and fsync, then `<out>.index.json`
(documents done, bytes committed, the settings) is replaced atomically. A run that finds an
index truncates the JSON lines to the committed bytes (a crash loses at most the batch in flight)
and goes on after the documents done; no line is ever written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from datamodules.corpus import load_documents
from datamodules.packed import replace_atomically
from datamodules.reformulate_lm import Decoding, LanguageModel
from haipai_lightning.config import ConfigError

PROMPTS = Path(__file__).resolve().parent / "prompts"
FORMAT = "haipai-mga-v1"
_PAIR = re.compile(r"genre\s*[:=]\s*(?P<genre>[^|\n]+?)\s*\|\s*audience\s*[:=]\s*(?P<audience>[^|\n]+)", re.I)


@dataclass
class ReformulateConfig:
    k: int = 3
    """(genre, audience) pairs, i.e. reformulations, per document."""
    pairs_prompt: str = str(PROMPTS / "mga_pairs.txt")
    rewrite_prompt: str = str(PROMPTS / "mga_rewrite.txt")
    fallback_pairs: str = str(PROMPTS / "mga_default_pairs.txt")
    batch_size: int = 8
    """Documents per batch: what a crash can lose, and the prompts sent to the LM at once (x k for rewrites)."""
    max_document_chars: int = 4000
    """Documents are cut to this many characters inside the prompts (a small LM's context)."""
    pair_tokens: int = 64
    decoding: Decoding = field(default_factory=Decoding)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k {self.k} must be >= 1 (reformulations per document)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size {self.batch_size} must be >= 1 (documents per batch)")
        for name in ("pairs_prompt", "rewrite_prompt", "fallback_pairs"):
            if not Path(getattr(self, name)).expanduser().is_file():
                raise FileNotFoundError(f"--{name} {getattr(self, name)!r} does not exist; point it at a text file "
                                        f"(the defaults are in {PROMPTS})")


def fill(template: str, **fields: str) -> str:
    """Literal replacement of {name} placeholders (no str.format: a prompt file cannot reach attributes)."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


def parse_pairs(text: str, k: int) -> list[tuple[str, str]]:
    """The first k distinct well-formed pairs of the generator's answer."""
    out: list[tuple[str, str]] = []
    for m in _PAIR.finditer(text):
        pair = (m["genre"].strip(" .*-\"'"), m["audience"].strip(" .*-\"'"))
        if all(pair) and pair not in out:
            out.append(pair)
    return out[:k]


def read_fallback(path: str) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            if line.count("|") != 1:
                raise ConfigError(f"--fallback_pairs {path!r} line {n}: write 'genre | audience'")
            g, a = (x.strip() for x in line.split("|"))
            pairs.append((g, a))
    if not pairs:
        raise ConfigError(f"--fallback_pairs {path!r} holds no 'genre | audience' line")
    return pairs


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings(source: str, cfg: ReformulateConfig, model_name: str) -> dict:
    """What must not change between a run and its resume."""
    files = {f: _sha(Path(getattr(cfg, f)).expanduser().read_text(encoding="utf-8"))
             for f in ("pairs_prompt", "rewrite_prompt", "fallback_pairs")}
    return {"format": FORMAT, "source": source, "k": cfg.k, "model": model_name, "prompts_sha256": files,
            "decoding": asdict(cfg.decoding), "max_document_chars": cfg.max_document_chars}


def _open_run(out: Path, spec: dict, overwrite: bool) -> int:
    """Documents already done; the JSON lines cut back to what the index committed."""
    index_path = out.with_name(out.name + ".index.json")
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("settings") != spec:
            if not overwrite:
                raise ConfigError(f"--out {str(out)!r} was written with other settings ({index_path.name}); pass "
                                  "--overwrite true to start again, or the same source, k, model, prompts and decoding")
        else:
            if not out.exists() or out.stat().st_size < int(index["bytes"]):
                raise ConfigError(f"--out {str(out)!r} is shorter than its index says ({index_path.name}); it was "
                                  "changed outside haipai reformulate: pass --overwrite true to start again")
            with open(out, "ab") as f:  # uncommitted bytes of a crashed batch go; committed lines stay
                f.truncate(int(index["bytes"]))
            return int(index["done"])
    elif out.exists() and out.stat().st_size and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and was not written by haipai reformulate (no {index_path.name}); "
                          "choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"")
    replace_atomically(index_path, lambda f: f.write(json.dumps({"settings": spec, "done": 0, "bytes": 0}).encode()))
    return 0


def reformulate(source: str, out: str | os.PathLike, lm: LanguageModel, cfg: ReformulateConfig | None = None,
                text_field: str = "text", max_documents: int | None = None, overwrite: bool = False,
                on_batch: Callable[[int], None] | None = None) -> dict:
    """Rewrite every document of `source` k ways into the JSON lines file `out`; returns the index."""
    cfg = cfg or ReformulateConfig()
    out = Path(out).expanduser()
    docs = load_documents(source, text_field)[:max_documents]
    spec = settings(source, cfg, lm.name)
    done = _open_run(out, spec, overwrite)
    pairs_t = Path(cfg.pairs_prompt).expanduser().read_text(encoding="utf-8")
    rewrite_t = Path(cfg.rewrite_prompt).expanduser().read_text(encoding="utf-8")
    fallback = read_fallback(cfg.fallback_pairs)
    d = cfg.decoding
    for start in range(done, len(docs), cfg.batch_size):
        ids = list(range(start, min(start + cfg.batch_size, len(docs))))
        cut = {i: docs[i][: cfg.max_document_chars] for i in ids}
        answers = lm.complete([fill(pairs_t, document=cut[i], k=str(cfg.k)) for i in ids],
                              Decoding(cfg.pair_tokens, d.temperature, d.top_p, d.seed + start))
        plan = []  # (doc id, variant, genre, audience, pair source)
        for i, answer in zip(ids, answers):
            pairs = [(g, a, "model") for g, a in parse_pairs(answer, cfg.k)]
            pool = [p for p in fallback if p not in [(g, a) for g, a, _ in pairs]] or fallback
            rng = random.Random(f"{d.seed}:{i}")  # the fallback depends on the document, not on the batch
            pairs += [(g, a, "fallback") for g, a in rng.sample(pool, min(cfg.k - len(pairs), len(pool)))]
            while len(pairs) < cfg.k:  # fewer fallback pairs than k: repeat them
                pairs.append((*rng.choice(fallback), "fallback"))
            plan += [(i, j, g, a, src) for j, (g, a, src) in enumerate(pairs)]
        texts = lm.complete([fill(rewrite_t, document=cut[i], genre=g, audience=a) for i, _, g, a, _ in plan],
                            Decoding(d.max_new_tokens, d.temperature, d.top_p, d.seed + start))
        lines = "".join(json.dumps({"text": t.strip(), "source": source, "source_id": i, "source_sha256": _sha(docs[i]),
                                    "variant": j, "genre": g, "audience": a, "pair_source": src, "model": lm.name},
                                   ensure_ascii=False) + "\n" for (i, j, g, a, src), t in zip(plan, texts))
        with open(out, "ab") as f:  # one write, then fsync: the batch is on disk before the index says so
            f.write(lines.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        index = {"settings": spec, "done": ids[-1] + 1, "bytes": size}
        replace_atomically(out.with_name(out.name + ".index.json"), lambda f: f.write(json.dumps(index).encode()))
        if on_batch is not None:
            on_batch(ids[-1] + 1)
    return json.loads(out.with_name(out.name + ".index.json").read_text())


def read_reformulations(path: str | os.PathLike) -> list[dict]:
    """The records of a reformulation file (tests, inspection)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_fanout(records: Sequence[dict], k: int) -> None:
    """Every source document has exactly variants 0..k-1, each once (raises ValueError otherwise)."""
    seen: dict[int, list[int]] = {}
    for r in records:
        seen.setdefault(r["source_id"], []).append(r["variant"])
    bad = {i: v for i, v in seen.items() if sorted(v) != list(range(k))}
    if bad:
        raise ValueError(f"documents without exactly k={k} variants: {dict(list(bad.items())[:5])}")
