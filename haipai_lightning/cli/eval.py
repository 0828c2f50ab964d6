"""`haipai eval`: perplexity, lm-evaluation-harness tasks and an efficiency report for a checkpoint."""

from __future__ import annotations

import json as jsonlib
import os
import sys
from typing import Any

from haipai_lightning.config import ConfigError


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    print(f"\n{title}\n| {'metric'.ljust(w)} | {'value'.ljust(v)} |\n|{'-' * (w + 2)}|{'-' * (v + 2)}|")
    for k, x in rows:
        print(f"| {k.ljust(w)} | {x.ljust(v)} |")


def eval_command(
    ckpt_path: str,
    data: str | None = None,
    split: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    perplexity: bool = True,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    efficiency: bool = True,
    decode_tokens: int = 64,
    json: str | None = None,
    compress: str | None = None,
    kv_budget: float = 0.25,
    compress_tail: int = 32,
) -> dict[str, Any]:
    """Evaluate a checkpoint: validation perplexity, lm-evaluation-harness tasks, efficiency report.

    Args:
        ckpt_path: a Haipai .ckpt (e.g. lightning_logs/version_0/checkpoints/last.ckpt).
        data: text to score: null = the checkpoint's training corpus (its held-out validation
            documents); or kjv, a .txt/.jsonl/.parquet file or directory, a Hub dataset name.
        split: val (the held-out documents, as the data module splits them) or all; default val
            for the checkpoint's corpus, all for --data.
        seq_len: tokens of context per scored block (default: the training seq_len, else max_seq_len).
        batch_size: blocks (perplexity) or requests (lm_eval) per forward.
        max_tokens: score only the first N tokens of the text (quick runs); null = all.
        perplexity: compute the perplexity.
        tasks: comma-separated lm_eval tasks: names (hellaswag, piqa, ... -- online: the data comes
            from the Hub), `mor` (the MoR paper's suite: lambada_openai, hellaswag, piqa, winogrande,
            arc_easy, arc_challenge, mmlu), haipai_kjv_cloze (a shipped offline task), or paths to
            task YAML files / directories (local tasks). null = none.
        num_fewshot: few-shot examples per task (null = each task's default).
        limit: documents per task (an int) or a fraction (< 1); null = all.
        efficiency: measure parameters, training FLOPs/token, decode tokens/s, KV-cache bytes, peak memory.
        decode_tokens: new tokens decoded for the efficiency report's timing.
        json: write every figure to this JSON file.
        compress: perplexity with compressed contexts (docs/compression.md): ehpc, reform, merge, recent or
            random; null = off.
        kv_budget: the compression's KV budget (a fraction of the context <= 1, or tokens).
        compress_tail: with --compress, tokens scored at the end of each block after the compressed context.
    """
    import torch

    from haipai_lightning.io.checkpoint import load_checkpoint_file
    from haipai_lightning.io.loader import load_model

    if tasks:  # a typo in a task name fails now, not after minutes of perplexity
        try:
            from haipai_lightning.eval.lm_eval_adapter import check_tasks
        except ImportError as e:
            raise ConfigError(f"--tasks needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})") from e
        check_tasks([t.strip() for t in tasks.split(",") if t.strip()])
    model, tok = load_model(ckpt_path)
    if tok is None:
        raise ConfigError(f"{ckpt_path!r} holds no tokenizer; it was not trained through a Haipai data module")
    data_hp = load_checkpoint_file(ckpt_path).get("datamodule_hyper_parameters") or {}
    T = seq_len or min(int(data_hp.get("seq_len", model.cfg.max_seq_len)), model.cfg.max_seq_len)
    report: dict[str, Any] = {"checkpoint": os.path.abspath(ckpt_path), "seq_len": T}
    ids = None
    if perplexity or efficiency:
        from haipai_lightning.eval.perplexity import encode_documents, eval_documents

        if perplexity or data is not None:
            docs, src, used_split = eval_documents(data, split, data_hp)
            stream, n_bytes = encode_documents(tok, docs)
            if max_tokens is not None:
                n_bytes = int(n_bytes * min(1.0, max_tokens / len(stream)))  # bytes pro rata, for bits/byte
                stream = stream[:max_tokens]
            ids = torch.from_numpy(stream)
    if perplexity:
        from haipai_lightning.eval.perplexity import perplexity as ppl_fn

        cc = None
        if compress is not None:  # issue #21: the context of each block compressed (compress/prefill.py)
            from haipai_lightning.compress.config import CompressConfig

            cc = CompressConfig(method=compress, budget=kv_budget)
            report["compress"] = {"method": compress, "kv_budget": kv_budget, "tail": compress_tail}
        res = ppl_fn(model, ids, T, batch_size, n_bytes, compress=cc, compress_tail=compress_tail)
        res.source, res.split = src, used_split
        report["perplexity"] = res.as_dict()
        bpb = "n/a" if res.bits_per_byte is None else f"{res.bits_per_byte:.4f}"
        _print_table(f"Perplexity on {src} ({used_split}), blocks of {T} tokens", [
            ("tokens scored", f"{res.tokens:,}"), ("mean NLL (nats/token)", f"{res.nll:.4f}"),
            ("perplexity", f"{res.ppl:.3f}"), ("bits per byte", bpb)])
    if tasks:
        try:
            from haipai_lightning.eval.lm_eval_adapter import HaipaiLM, run_lm_eval
        except ImportError as e:
            raise ConfigError(f"--tasks needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})") from e
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        lim = int(limit) if limit is not None and limit >= 1 else limit
        results = run_lm_eval(HaipaiLM(model=model, tokenizer=tok, batch_size=batch_size), names, num_fewshot, lim)
        report["lm_eval"] = results
        _print_table("lm-evaluation-harness", [(f"{task} {m}", f"{v:.4f}") for task, ms in results.items()
                                              for m, v in ms.items() if "," in m and "stderr" not in m])
    if efficiency:
        from haipai_lightning.analysis.efficiency import efficiency_report

        eff = efficiency_report(model, ids, seq_len=T, new_tokens=decode_tokens)
        report["efficiency"] = eff.as_dict()
        _print_table("Efficiency", eff.rows())
    if json:
        tmp = f"{json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            jsonlib.dump(report, f, indent=2)
        os.replace(tmp, json)
        print(f"\nwrote {json}", file=sys.stderr)
    return report
