"""The quantization report: validation perplexity, size on disk and CPU decode speed, per method.

Perplexity runs every validation block through a fresh decoding cache (one batched prefill), so a
KV-quantized model attends over its dequantized low-bit keys/values; for the other methods this
is the plain forward (MoR routes by its causal thresholds either way in eval mode). Size on disk
is the size of model.safetensors in a real export (io/export.py) of the quantized model. Decode
speed is greedy cached generation of one sequence (batch 1), the way a CPU user runs it; the fp32
model is timed again beside every method, in alternation, so both see the same machine load.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.io.export import WEIGHTS, save_pretrained
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.quant.kv_cache import kv_bytes_per_token
from haipai_lightning.quant.methods import get_method, quantize_model


@dataclass
class MethodReport:
    method: str
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float
    size_mb_before: float
    size_mb_after: float
    decode_tok_s_before: float
    decode_tok_s_after: float
    kv_bytes_per_token: float  # keys + values of one token in one layer application, all kv heads

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """exp(mean next-token NLL) over the batches' labelled tokens, each batch prefilled through a fresh cache."""
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        logits = model(ids, cache=model.new_cache(ids.size(1))).logits
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                     reduction="sum"))
        n += int((labels != -100).sum())
    return math.exp(nll / max(n, 1))


def size_on_disk(model: nn.Module) -> int:
    """Bytes of model.safetensors when `model` is exported."""
    with tempfile.TemporaryDirectory() as d:
        return (save_pretrained(model, Path(d) / "m", arch={}) / WEIGHTS).stat().st_size


@torch.no_grad()
def decode_tokens_per_s(models: list[nn.Module], prompt: torch.Tensor, new_tokens: int = 32,
                        reps: int = 3) -> list[float]:
    """Greedy cached decoding of one sequence by each model: new tokens per second (median of reps,
    after a warm-up). The models run in alternation, so machine noise hits them alike."""
    s = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, seed=None)
    for m in models:
        generate(m, prompt, SamplingConfig(max_new_tokens=2, temperature=0.0, seed=None))  # warm-up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(reps):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            generate(m, prompt, s)
            times[i].append(time.perf_counter() - t0)
    return [new_tokens / statistics.median(t) for t in times]


def evaluate_methods(model: nn.Module, methods: list[str], batches: list[dict[str, torch.Tensor]],
                     prompt: torch.Tensor | None = None, new_tokens: int = 32, reps: int = 3,
                     calib: list[dict[str, torch.Tensor]] | None = None) -> list[MethodReport]:
    """One MethodReport per method, against the fp32 model (which is not modified).

    calib: calibration batches for the calibrated methods (GPTQ, GuidedQuant, SpinQuant); never the
    evaluation batches. None: sequences sampled from the model itself (quant/calibration.py)."""
    model = model.eval()
    prompt = batches[0]["input_ids"][:1, :16] if prompt is None else prompt
    new_tokens = min(new_tokens, model.cfg.max_seq_len - prompt.size(1))
    base_ppl, base_size = perplexity(model, batches), size_on_disk(model)
    kv_heads, hd = model.cfg.kv_heads, model.cfg.head_dim
    rows = []
    for name in methods:
        spec = get_method(name)
        q = quantize_model(model, spec, calib=calib)
        ppl = perplexity(q, batches)
        before, after = decode_tokens_per_s([model, q], prompt, new_tokens, reps)  # fp32 timed beside it
        rows.append(MethodReport(
            method=name, ppl_before=base_ppl, ppl_after=ppl, ppl_change_pct=100 * (ppl / base_ppl - 1),
            size_mb_before=base_size / 1e6, size_mb_after=size_on_disk(q) / 1e6,
            decode_tok_s_before=before, decode_tok_s_after=after,
            kv_bytes_per_token=2 * kv_heads * kv_bytes_per_token(spec.kv, hd),
        ))
    return rows


COLUMNS = ["method", "ppl_before", "ppl_after", "ppl_change_pct", "size_mb_before", "size_mb_after",
           "decode_tok_s_before", "decode_tok_s_after", "kv_bytes_per_token"]


def format_table(rows: list[MethodReport]) -> str:
    """A Markdown table (it reads as a plain table in a terminal too)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(getattr(r, c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def log_tensorboard(writer: Any, rows: list[MethodReport], step: int = 0) -> None:
    """Scalars quantization/<method>/<metric> and the table as text, on a SummaryWriter."""
    for r in rows:
        for c in COLUMNS[1:]:
            writer.add_scalar(f"quantization/{r.method}/{c}", getattr(r, c), step)
    writer.add_text("quantization/report", format_table(rows), step)
    writer.flush()
