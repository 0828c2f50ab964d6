"""Mamba vs attention: train and decode throughput at sequence lengths 256 / 1024 / 4096.

One mixer layer, d_model 256 (attention: 4 heads, SDPA; Mamba: expand 2, state 16, conv 4,
chunked PyTorch scan on CPU). Both are timed alternately in the same run, median of reps.
  - train: forward + backward on 4096 tokens per step (batch 4096 / T sequences of T);
  - decode: one sequence, a prompt of T tokens prefilled into the cache, then `steps` single
    tokens; attention's step reads a cache that grows with T, Mamba's step is constant.
Crossover: the shortest length at which Mamba's throughput reaches attention's.

    python benchmarks/mixers.py [--quick] [--json out.json]       (--quick: 256 and 1024 only)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import alternate, parser, table, write_json  # noqa: E402
from haipai_lightning.model.cache import KVView, LayerKV  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.model.rope import RotaryEmbedding  # noqa: E402
from haipai_lightning.model.mixers import Attention, Mamba  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()  # --threads is handled by the common parser
    lengths = [256, 1024] if args.quick else [256, 1024, 4096]
    d, tokens, steps, reps = 256, 4096, 32, (3 if args.quick else 5)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=d, n_layers=1, n_heads=4, max_seq_len=max(lengths) + steps)
    mixers = {"attention": Attention(cfg), "mamba": Mamba(cfg)}
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len)
    rows, ratios = [], {}
    for T in lengths:
        B = max(1, tokens // T)
        x = torch.randn(B, T, d)
        cos, sin = rope(torch.arange(T))

        def train(m):
            def step():
                m(x, cos, sin).sum().backward()
                m.zero_grad(set_to_none=True)
            return step

        tt = alternate({k: train(m) for k, m in mixers.items()}, reps)
        prompt, new = torch.randn(1, T, d), torch.randn(1, steps, d)

        def decode(m):
            @torch.no_grad()
            def run():
                layer = LayerKV(T + steps)
                m(prompt, cos, sin, KVView(layer, torch.arange(T)))  # prefill (timed apart below)
                t0 = time.perf_counter()
                for i in range(steps):
                    pos = torch.tensor([T + i])
                    c, s = rope(pos)
                    m(new[:, i : i + 1], c, s, KVView(layer, pos))
                return time.perf_counter() - t0
            return run

        dec = {k: [] for k in mixers}
        for _ in range(reps):
            for k, m in mixers.items():
                dec[k].append(decode(m)())
        dt = {k: statistics.median(v) for k, v in dec.items()}
        for k in mixers:
            rows.append({"seq": T, "mixer": k, "train tok/s": B * T / tt[k], "decode tok/s": steps / dt[k]})
        ratios[T] = {"train": tt["attention"] / tt["mamba"], "decode": dt["attention"] / dt["mamba"]}
        rows[-1]["mamba/attn train"] = ratios[T]["train"]
        rows[-1]["mamba/attn decode"] = ratios[T]["decode"]
    cross = {kind: next((T for T in lengths if ratios[T][kind] >= 1.0), None) for kind in ("train", "decode")}
    # Where a crossover lies beyond the lengths measured: attention's time per token is ~ a + b T
    # (projections + the T keys each query reads), Mamba's ~ constant; fit a, b on the two longest.
    est = {}
    for kind, col in (("train", "train tok/s"), ("decode", "decode tok/s")):
        attn = {r["seq"]: r for r in rows if r["mixer"] == "attention"}
        (T1, r1), (T2, r2) = [(T, attn[T]) for T in lengths[-2:]]
        b = (1 / r2[col] - 1 / r1[col]) / (T2 - T1)
        a = 1 / r2[col] - b * T2
        mamba = 1 / next(r for r in rows if r["seq"] == T2 and r["mixer"] == "mamba")[col]
        est[kind] = (mamba - a) / b if b > 0 else float("inf")
    print(f"one mixer layer, d={d}; train: fwd+bwd on {tokens} tokens; decode: batch 1, {steps} steps after a "
          f"prompt of seq tokens; median of {reps}; torch threads {torch.get_num_threads()}")
    print(table(rows, ["seq", "mixer", "train tok/s", "decode tok/s", "mamba/attn train", "mamba/attn decode"]))
    print("crossover (shortest length where Mamba >= attention):",
          {k: (v if v is not None else f"none up to {lengths[-1]}") for k, v in cross.items()})
    print("crossover estimated from a linear fit of attention's time per token:",
          {k: f"~{v:.0f} tokens" for k, v in est.items()})
    headline = {f"{kind}_ratio_{T}": ratios[T][kind] for T in lengths for kind in ("train", "decode")}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, crossover=cross, crossover_estimate=est,
               shape={"d_model": d, "tokens": tokens, "steps": steps})


if __name__ == "__main__":
    main()
