"""Haipai (Nr=1) against litgpt on the same Llama-style shape: training-step tokens/s and MFU.

One run builds the same decoder in both frameworks (RMSNorm, RoPE, grouped-query SDPA
attention, SwiGLU, untied head; identical parameter count, checked), trains each with the
same loss and AdamW settings on the same random batches, and times full training steps
(forward + cross-entropy + backward + optimizer step) in alternation, so machine noise hits
every arm alike. Arms:

- litgpt eager / litgpt compiled: `litgpt.model.GPT`; its pretrain recipe compiles the model
  and uses torch's default (non-fused) AdamW off CUDA.
- haipai eager / haipai compiled: `MoRLightningModule(compile=True)`'s forward, with fused
  AdamW (PyTorch's single-kernel CPU AdamW).

MFU = model FLOPs per second / the fp32 matmul peak measured in this run (a 2048^3 matmul timed
as one more arm of the same alternation, so it sees the same machine load), model FLOPs from `haipai_lightning.flops.training_flops` (6N-style: 3 x forward matmul FLOPs,
attention included). Needs litgpt: `pip install -e ".[bench]"`.

    python benchmarks/vs_litgpt.py [--quick] [--threads 1] [--json benchmarks/results/vs_litgpt.json]

Every arm is also timed in process CPU time: on a machine shared with other jobs, wall time
includes the time the process was descheduled; CPU time does not (with --threads 1 there is
no thread pool spinning either), so `speedup_vs_litgpt_cpu_time` is the robust ratio there.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.analysis.flops import training_flops  # noqa: E402
from haipai_lightning.train.module import MoRLightningModule  # noqa: E402


PEAK_N = 2048  # the matmul peak: one fp32 2048^3 matmul (2 n^3 FLOPs), timed as one more alternating arm


def alternate_all(fns: dict[str, Callable[[], None]], reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of every call, arms run in alternation so machine noise hits them alike.

    CPU time counts only the cycles this process got, so time spent descheduled on a shared
    machine does not count; with --threads 1 (no thread pool spinning) it is the robust figure.
    """
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def litgpt_model(d: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, seq: int) -> torch.nn.Module:
    from litgpt.config import Config
    from litgpt.model import GPT

    cfg = Config(name="haipai-shape", block_size=seq, vocab_size=vocab, padded_vocab_size=vocab, n_layer=layers,
                 n_head=heads, n_query_groups=kv_heads, n_embd=d, rotary_percentage=1.0, parallel_residual=False,
                 bias=False, norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP",
                 intermediate_size=ffn, rope_base=10000)
    return GPT(cfg)


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        logits = forward(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    if not args.threads:  # common.parser sets it when given; default: the 2 cores of the reference machine
        torch.set_num_threads(2)
    torch.manual_seed(0)
    # the shape of MACHINE.md's reference measurement: d=256, 4 layers, 4 heads, SwiGLU 768, vocab 8192
    d, layers, heads, kv_heads, ffn, vocab = 256, 4, 4, 4, 768, 8192
    B, T = (4, 128) if args.quick else (8, 256)
    reps = args.reps or (5 if args.quick else 15)
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      ffn_hidden=ffn, max_seq_len=T, tie_embeddings=False, n_recursions=1)
    x = torch.randint(0, vocab, (B, T))
    y = torch.randint(0, vocab, (B, T))
    adamw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    arms: dict[str, Callable[[], None]] = {}
    params: dict[str, int] = {}
    compile_s: dict[str, float] = {}
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        lit = litgpt_model(d, layers, heads, kv_heads, ffn, vocab, T)
        fwd = torch.compile(lit) if compiled else lit
        arms[f"litgpt {tag}"] = train_step(fwd, torch.optim.AdamW(lit.parameters(), **adamw), x, y)
        params[f"litgpt {tag}"] = sum(q.numel() for q in lit.parameters())
        hp = MoRLightningModule(config=cfg, compile=compiled)
        arms[f"haipai {tag}"] = train_step(lambda ids, hp=hp: hp(ids).logits,
                                           torch.optim.AdamW(hp.model.parameters(), fused=True, **adamw), x, y)
        params[f"haipai {tag}"] = sum(q.numel() for q in hp.model.parameters())
        if compiled:  # compile outside the timed region (first call), and say how long it took
            for k in (f"litgpt {tag}", f"haipai {tag}"):
                t0 = time.perf_counter()
                arms[k]()
                arms[k]()
                compile_s[k] = time.perf_counter() - t0
    if len(set(params.values())) != 1:
        raise SystemExit(f"the two models differ in size: {params}")
    model = MoRLightningModule(config=cfg).model
    flops_step = training_flops(model, model(x).records, B, T)

    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    arms["matmul peak"] = lambda: a @ b
    for f in arms.values():  # warm-up
        f()
    times, cpu_times = alternate_all(arms, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed sample of each arm
    peak = 2.0 * PEAK_N**3 / med.pop("matmul peak")
    peak_best = 2.0 * PEAK_N**3 / best.pop("matmul peak")
    peak_cpu = 2.0 * PEAK_N**3 / cpu.pop("matmul peak")  # FLOPs per CPU-second of the matmul
    rows = []
    for k, s in med.items():
        rows.append({"arm": k, "params": params[k], "s/step": s, "tokens/s": B * T / s,
                     "best tokens/s": B * T / best[k], "CPU s/step": cpu[k], "GFLOP/s": flops_step / s / 1e9,
                     "MFU": flops_step / s / peak, "MFU (CPU time)": flops_step / cpu[k] / peak_cpu,
                     "compile s": compile_s.get(k, 0.0)})
    tps = {r["arm"]: r["tokens/s"] for r in rows}
    tps_best = {r["arm"]: r["best tokens/s"] for r in rows}
    cpu_tps = {r["arm"]: B * T / r["CPU s/step"] for r in rows}
    for r in rows:
        r["vs litgpt eager"] = r["tokens/s"] / tps["litgpt eager"]
        r["vs litgpt eager (CPU time)"] = cpu_tps[r["arm"]] / cpu_tps["litgpt eager"]
    best_lit = max(("litgpt eager", "litgpt compiled"), key=tps.get)
    best_hp = max(("haipai eager", "haipai compiled"), key=tps.get)
    print(f"\nd={d}, {layers} layers, {heads} heads ({kv_heads} kv), SwiGLU {ffn}, vocab {vocab}, untied; "
          f"batch {B}x{T}; {params['haipai eager']} parameters; {torch.get_num_threads()} threads; "
          f"median of {reps} alternating steps; matmul peak {peak / 1e9:.1f} GFLOP/s (median, same alternation; "
          f"best {peak_best / 1e9:.1f}); {flops_step / (B * T) / 1e6:.2f} MFLOP/token (training)")
    print(table(rows, ["arm", "s/step", "tokens/s", "best tokens/s", "MFU", "vs litgpt eager", "CPU s/step",
                       "MFU (CPU time)", "vs litgpt eager (CPU time)", "compile s"]))
    headline = {
        # each framework at its faster setting in this run (median step times)
        "speedup_vs_litgpt": tps[best_hp] / tps[best_lit],
        "speedup_eager": tps["haipai eager"] / tps["litgpt eager"],
        "speedup_compiled": tps["haipai compiled"] / tps["litgpt compiled"],
        "speedup_vs_litgpt_best_samples": max(tps_best["haipai eager"], tps_best["haipai compiled"])
        / max(tps_best["litgpt eager"], tps_best["litgpt compiled"]),
        # the same comparison in process CPU time (robust to a shared machine's descheduling)
        "speedup_vs_litgpt_cpu_time": max(cpu_tps["haipai eager"], cpu_tps["haipai compiled"])
        / max(cpu_tps["litgpt eager"], cpu_tps["litgpt compiled"]),
        "mfu": max(r["MFU"] for r in rows if r["arm"].startswith("haipai")),
        "mfu_cpu_time": max(r["MFU (CPU time)"] for r in rows if r["arm"].startswith("haipai")),
        "haipai_tokens_per_s": tps[best_hp],
        "litgpt_tokens_per_s": tps[best_lit],
    }
    print(f"fastest: {best_hp} vs {best_lit}")
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, peak_flops=peak, peak_flops_best=peak_best, flops_per_step=flops_step,
               peak_flops_cpu_time=peak_cpu, times=times, cpu_times=cpu_times, reps=reps,
               shape={"d_model": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads, "ffn": ffn,
                      "vocab": vocab, "batch": B, "seq_len": T})


if __name__ == "__main__":
    main()
