"""Text difficulty measures of "Beyond Random Sampling" (Zhang et al., arXiv 2506.11300, section 3.2).

The paper finds three signals the most useful curriculum orderings for pretraining:

    compression   zlib-compressed bytes / raw bytes: repetitive, predictable text compresses well
                  and is easy (the paper's "compression ratio" raw/compressed, inverted so that a
                  larger score is harder, like every Haipai curriculum score)
    mtld          Measure of Textual Lexical Diversity (McCarthy & Jarvis 2010, Behavior Research
                  Methods 42:381): the mean length of word runs that keep a type-token ratio above
                  0.72; a varied vocabulary is harder
    flesch        minus the Flesch Reading Ease (Flesch 1948): long sentences and long words are
                  harder (the minus makes larger = harder)

Every function takes one document's text and returns a float; `text_scores` maps a list.
"""

from __future__ import annotations

import functools
import re
import zlib

_WORD = re.compile(r"[A-Za-z\u00C0-\u024F]+(?:['\u2019][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"[.!?]+|\n\s*\n")

MTLD_THRESHOLD = 0.72  # McCarthy & Jarvis (2010): the TTR at which a factor is complete


def compression_ratio(text: str) -> float:
    """zlib(level 9) compressed size / raw UTF-8 size; in (0, ~1.1], larger = less redundant = harder."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _mtld_pass(tokens: list[str], threshold: float) -> float:
    factors, types, count = 0.0, set(), 0
    for w in tokens:
        types.add(w)
        count += 1
        if len(types) / count <= threshold:  # the run's type-token ratio fell to the threshold: one full factor
            factors, types, count = factors + 1, set(), 0
    if count:  # the remainder counts as the fraction of a factor it has used up (ttr 1 -> 0, threshold -> 1)
        factors += (1 - len(types) / count) / (1 - threshold)
    return len(tokens) / factors if factors else float(len(tokens))


def mtld(text: str, threshold: float = MTLD_THRESHOLD) -> float:
    """MTLD: the mean of the forward and the backward pass's mean factor length (words per factor).

    Written out (about 15 lines) rather than imported from `lexicalrichness`: that package adds a
    dependency for one function whose definition is fixed by the paper cited above.
    """
    tokens = words(text)
    if not tokens:
        return 0.0
    return 0.5 * (_mtld_pass(tokens, threshold) + _mtld_pass(tokens[::-1], threshold))


@functools.lru_cache(maxsize=1)
def _hyphenator():
    # pyphen (LibreOffice's hyphenation dictionaries, bundled): syllables = hyphenation points + 1, the
    # count textstat itself falls back to. textstat's first choice, CMUdict through nltk, downloads its
    # data on first use, which fails offline; pyphen needs nothing beyond the wheel.
    import pyphen

    return pyphen.Pyphen(lang="en_US")


@functools.lru_cache(maxsize=1 << 16)  # a corpus repeats its words: hyphenate each once
def syllables(word: str) -> int:
    return len(_hyphenator().positions(word)) + 1


def flesch_reading_ease(text: str) -> float:
    """206.835 - 1.015 (words / sentences) - 84.6 (syllables / words) (Flesch 1948); higher = easier."""
    ws = words(text)
    if not ws:
        return 0.0
    # sentences: the pieces between . ! ? (or blank lines) that hold a word
    n_sentences = max(1, sum(1 for piece in _SENTENCE_END.split(text) if _WORD.search(piece)))
    n_syll = sum(syllables(w) for w in ws)
    return 206.835 - 1.015 * len(ws) / n_sentences - 84.6 * n_syll / len(ws)


MEASURES = {
    "compression": compression_ratio,
    "mtld": mtld,
    "flesch": lambda text: -flesch_reading_ease(text),  # larger = harder
}


def text_scores(kind: str, texts: list[str]):
    """(n_docs,) float64 difficulty of each text by measure `kind` (a key of MEASURES)."""
    import numpy as np

    fn = MEASURES[kind]
    return np.array([fn(t) for t in texts], dtype=np.float64)
