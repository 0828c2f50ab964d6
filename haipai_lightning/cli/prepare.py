"""`haipai prepare`: tokenize a corpus into sharded token files for datamodules.StreamingDataModule."""

from __future__ import annotations


def prepare_command(source: str, out: str, tokenizer: str | None = None, workers: int = 1, text_field: str = "text",
                    vocab_size: int = 8192, bpe_sample_mb: float = 64.0, val_fraction: float = 0.005,
                    seed: int = 1234, shard_tokens: int = 1 << 25, max_documents: int | None = None,
                    hub_config: str | None = None, overwrite: bool = False, verify: bool = False,
                    scores: list[str] | None = None, score_reference: str | None = None) -> dict:
    """Tokenize a corpus into sharded token files (constant memory, N processes) for StreamingDataModule.

    Args:
        source: kjv, local .txt/.jsonl/.json/.parquet files, folders or globs, or a Hugging Face Hub dataset
            name (read with streaming=True); comma-separated parts are concatenated in order.
        out: the directory to write (new, empty, or one written by `haipai prepare` with --overwrite true).
        tokenizer: a tokenizer.json, a local transformers tokenizer folder or a Hub name
            (transformers.AutoTokenizer); null = train a byte-level BPE on the first --bpe_sample_mb MB.
        workers: encoding processes (the output is identical for any number).
        text_field: key/column of the text in .jsonl/.parquet/Hub data.
        vocab_size: size of the BPE trained when --tokenizer is null.
        bpe_sample_mb: MB of text (the first documents) the BPE is trained on.
        val_fraction: share of documents (chosen by a hash of their index) written to the val split.
        seed: seed of that choice.
        shard_tokens: tokens per shard file (2^25 = 64 MB of uint16).
        max_documents: stop after this many documents (quick runs); null = all.
        hub_config: the configuration of a Hub dataset (e.g. sample-10BT of HuggingFaceFW/fineweb-edu).
        overwrite: replace --out when it is a prepared directory (never another directory).
        verify: afterwards re-read every shard and check its sha256 against the index.
        scores: curriculum difficulty measures to store per train document (length, rare_words,
            reference_loss), for data.curriculum; null = none.
        score_reference: the checkpoint whose loss scores documents for reference_loss.
    """
    import time

    from datamodules.prepare import prepare, verify as verify_dir
    from datamodules.prepared_curriculum import add_scores

    t0 = time.perf_counter()
    index = prepare(source, out, tokenizer=tokenizer, workers=workers, text_field=text_field, vocab_size=vocab_size,
                    bpe_sample_mb=bpe_sample_mb, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
                    max_documents=max_documents, hub_config=hub_config, overwrite=overwrite)
    if scores:
        index = add_scores(out, list(scores), reference=score_reference)
    if verify:
        verify_dir(out)
    n = index["n_tokens"]
    print(f"prepared {out}: {n['train']:,} train + {n['val']:,} val tokens in "
          f"{sum(len(v) for v in index['splits'].values())} shards, vocab_size {index['vocab_size']} "
          f"({index['dtype']}), {time.perf_counter() - t0:.1f} s{' + scores ' + ','.join(scores) if scores else ''} "
          f"-- use data.prepared={out}")
    return index
