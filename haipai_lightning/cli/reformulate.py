"""`haipai reformulate`: Massive Genre-Audience reformulation of a corpus by a pluggable LM
(datamodules/reformulate.py, docs/data.md)."""

from __future__ import annotations

import sys

from haipai_lightning.config import ConfigError


def reformulate_command(
    source: str,
    out: str,
    model: str,
    backend: str = "haipai",
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    k: int = 3,
    pairs_prompt: str | None = None,
    rewrite_prompt: str | None = None,
    fallback_pairs: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    pair_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    max_document_chars: int = 4000,
    max_documents: int | None = None,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict:
    """Rewrite every document k ways, each for a (genre, audience) pair an LM proposes (MGA, arXiv 2502.04235).

    Args:
        source: the documents: kjv, local .txt/.jsonl/.parquet files or folders, a Hub dataset (as data.source).
        out: the JSON lines file to write (resumed when it was written by an interrupted run).
        model: a Haipai .ckpt (haipai), a transformers folder or Hub name (transformers), a served model id (openai).
        backend: haipai, transformers or openai (any OpenAI-compatible endpoint, `haipai serve` included).
        base_url: the endpoint of --backend openai, e.g. http://127.0.0.1:8000/v1.
        api_key_env: the environment variable holding the endpoint's API key (unset: no key).
        k: (genre, audience) pairs, i.e. reformulations, per document.
        pairs_prompt: the generator's prompt file ({document}, {k}); default datamodules/prompts/mga_pairs.txt.
        rewrite_prompt: the rewriter's prompt file ({document}, {genre}, {audience}).
        fallback_pairs: 'genre | audience' lines used when the generator proposes fewer than k pairs.
        batch_size: documents per batch (a crash loses at most one batch).
        max_new_tokens: tokens per rewrite.
        pair_tokens: tokens of the generator's answer (the k pairs).
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass.
        seed: sampling seed.
        max_document_chars: documents are cut to this many characters in the prompts.
        max_documents: only the first N documents (null = all).
        text_field: key/column of the text in .jsonl/.parquet/Hub sources.
        overwrite: start again when --out holds a run with other settings.
    """
    from datamodules.reformulate import ReformulateConfig, reformulate
    from datamodules.reformulate_lm import Decoding, make_lm

    if max_new_tokens < 1 or pair_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} and --pair_tokens {pair_tokens} must be >= 1, "
                          f"--temperature {temperature} >= 0 and --top_p {top_p} in (0, 1]")
    if max_documents is not None and max_documents < 1:
        raise ConfigError(f"--max_documents {max_documents} must be >= 1 (or null: all)")
    paths = {n: v for n, v in (("pairs_prompt", pairs_prompt), ("rewrite_prompt", rewrite_prompt),
                               ("fallback_pairs", fallback_pairs)) if v is not None}
    cfg = ReformulateConfig(k=k, batch_size=batch_size, max_document_chars=max_document_chars, pair_tokens=pair_tokens,
                            decoding=Decoding(max_new_tokens, temperature, top_p, seed), **paths)
    lm = make_lm(backend, model, base_url, api_key_env)
    index = reformulate(source, out, lm, cfg, text_field=text_field, max_documents=max_documents, overwrite=overwrite,
                        on_batch=lambda n: print(f"[reformulate] {n} documents done", file=sys.stderr, flush=True))
    print(f"{out}: {index['done']} documents x {k} reformulations ({lm.name})")
    return index
