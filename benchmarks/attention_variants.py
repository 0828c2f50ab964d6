"""Conditional attention variants (issue #19) vs plain attention: train speed and validation loss, one run.

Every model is the same small Mixture-of-Recursions model (middle cycle, Nr=3, expert-choice depth
routing, d=96, 4 heads / 2 kv heads), differing only in `model.mixer`:
  attention (baseline), moh (1 shared + top-2 of 3 routed heads), span (adaptive span, R=16),
  dtr (DTRNet token routing, capacity 0.1 / 0.5), cope (CoPE on top of RoPE), cope_norope (CoPE alone),
  cca (core-context-aware attention, groups of 8).
They train in lockstep on the same batches (AdamW, the model's aux losses included), so machine noise
hits them alike; a step's time is forward + backward + optimizer step, the median over the steps.
The data is a copy task that needs attention: each sequence is a random first half repeated, so the
second half is predictable only by looking back. Validation: next-token loss on the second halves of
held-out sequences, eval mode (routers decide by their causal thresholds).

Headline: `<variant>_train_speed_ratio` (variant tokens/s over attention's; > 1 is faster) and
`<variant>_val_loss_delta` (variant val loss - attention's; < 0 is better).

    python benchmarks/attention_variants.py [--quick] [--json out.json]     (--quick: about a minute on 2 cores)
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.model.mixers import (AdaptiveSpanAttention, Attention, CoPEAttention,  # noqa: E402
                                           CoreContextAttention, DTRNetAttention, MixtureOfHeadsAttention)
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

VARIANTS = {
    "attention": Attention,
    "moh": functools.partial(MixtureOfHeadsAttention, n_shared=1, top_k=2),
    "span": functools.partial(AdaptiveSpanAttention, ramp=16),
    "dtr": functools.partial(DTRNetAttention, capacity=0.1),
    "dtr50": functools.partial(DTRNetAttention, capacity=0.5),
    "cope": CoPEAttention,
    "cope_norope": functools.partial(CoPEAttention, rope=False),
    "cca": functools.partial(CoreContextAttention, group=8),
}


def copy_batch(gen: torch.Generator, B: int, T: int, V: int) -> torch.Tensor:
    """(B, T + 1) sequences: a random first half, then the same tokens again."""
    half = (T + 2) // 2
    first = torch.randint(1, V, (B, half), generator=gen)
    return torch.cat([first, first], 1)[:, : T + 1]


def main() -> None:
    args = parser(__doc__).parse_args()  # --threads is handled by the common parser
    V, d, B, T = 64, 96, 16, 64
    steps, n_val = (80, 4) if args.quick else (400, 16)
    cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=T,
                      n_recursions=3, sharing="middle_cycle")
    models, opts = {}, {}
    for name, mixer in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = HaipaiModel(cfg, mixer=mixer, router=ExpertChoiceRouter)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in models}
    train_loss: dict[str, float] = {}
    for step in range(steps):
        x = copy_batch(gen, B, T, V)
        for name, m in models.items():
            m.train()
            t0 = time.perf_counter()
            out = m(x[:, :-1])
            lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
            opts[name].zero_grad(set_to_none=True)
            (lm + sum(out.aux_losses.values())).backward()
            opts[name].step()
            if step > 0:  # the first step warms up
                times[name].append(time.perf_counter() - t0)
            train_loss[name] = lm.item()
    val_gen = torch.Generator().manual_seed(1)
    val = [copy_batch(val_gen, B, T, V) for _ in range(n_val)]
    rows, headline = [], {}
    half = (T + 2) // 2
    for name, m in models.items():
        m.eval()
        with torch.no_grad():
            losses = [F.cross_entropy(m(x[:, :-1]).logits[:, half:].flatten(0, 1), x[:, half + 1:].flatten()).item()
                      for x in val]
        sec = statistics.median(times[name])
        rows.append({"mixer": name, "params": sum(p.numel() for p in m.parameters()), "s/step": sec,
                     "tokens/s": B * T / sec, "train loss": train_loss[name], "val loss (2nd half)": sum(losses) / n_val})
    base = rows[0]
    for r in rows:
        r["speed ratio"] = r["tokens/s"] / base["tokens/s"]
        r["val delta"] = r["val loss (2nd half)"] - base["val loss (2nd half)"]
        if r["mixer"] != "attention":
            headline[f"{r['mixer']}_train_speed_ratio"] = r["speed ratio"]
            headline[f"{r['mixer']}_val_loss_delta"] = r["val delta"]
    print(f"copy task V={V}, d={d}, MoR Nr=3 expert choice, batch {B}x{T}, {steps} steps in lockstep, "
          f"torch threads {torch.get_num_threads()}")
    print(table(rows, ["mixer", "params", "s/step", "tokens/s", "speed ratio", "train loss", "val loss (2nd half)",
                       "val delta"]))
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, shape={"d_model": d, "batch": B, "seq_len": T, "steps": steps})


if __name__ == "__main__":
    main()
