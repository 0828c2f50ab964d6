"""MoR expert-choice vs full recursion: forward+backward time and KV entries, in one run.

The paper's 360M depth: 32 layers, middle-cycle, Nr=3 -> 2 unique layers + 10 shared layers
applied 3 times. Expert-choice capacities 1, 2/3, 1/3 keep 2 of the 3 passes' worth of
tokens, so the theory for the whole stack is (2 + 10 * 2) / 32 = 0.69 of the compute.

    python benchmarks/mor_compute.py [--quick] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parser, table, time_fn, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.base import FullRecursion  # noqa: E402


def kv_entries(model: HaipaiModel, x: torch.Tensor) -> int:
    """Keys/values actually computed in the shared recursion steps (rows through wk)."""
    n = 0

    def hook(mod, inp, out):
        nonlocal n
        n += inp[0].shape[0] * inp[0].shape[1]

    shared = {i for i in model.schedule.shared}
    hs = [model.layers[i].mixer.wk.register_forward_hook(hook) for i in shared]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return n


def main() -> None:
    args = parser(__doc__).parse_args()
    d, B, T, reps = (128, 4, 256, 2) if args.quick else (256, 8, 256, 3)
    torch.manual_seed(0)
    cfg = dict(vocab_size=4096, d_model=d, n_layers=32, n_heads=4, n_kv_heads=2, ffn_hidden=int(8 * d / 3),
               max_seq_len=T, n_recursions=3, sharing="middle_cycle")
    x = torch.randint(0, 4096, (B, T + 1))
    rows, times = [], {}
    for name, router, kv in [("full recursion", FullRecursion, "recursion_wise"),
                             ("MoR expert-choice", ExpertChoiceRouter, "recursion_wise"),
                             ("MoR expert-choice, shared KV", ExpertChoiceRouter, "shared")]:
        torch.manual_seed(0)
        m = HaipaiModel(ModelConfig(**cfg, kv_mode=kv), router=router)

        def step():
            out = m(x[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + sum(out.aux_losses.values())
            loss.backward()
            m.zero_grad(set_to_none=True)

        times[name] = time_fn(step, warmup=1, reps=reps)
        kv_n = kv_entries(m.train(), x[:, :-1])
        rows.append({"model": name, "kv_mode": kv, "fwd+bwd s": times[name], "kv entries": kv_n})
    base_t, base_kv = times["full recursion"], rows[0]["kv entries"]
    nr = 3
    theory = {"full recursion": (1.0, 1.0), "MoR expert-choice": ((2 + 10 * 2) / 32, (nr + 1) / (2 * nr)),
              "MoR expert-choice, shared KV": (None, 1 / nr)}
    for r in rows:
        r["time ratio"] = r["fwd+bwd s"] / base_t
        r["kv ratio"] = r["kv entries"] / base_kv
        r["time theory"], r["kv theory"] = theory[r["model"]]
        r["time theory"] = r["time theory"] if r["time theory"] is not None else "-"
    print(f"32 layers (2 unique + 10 shared x 3), d={d}, batch {B}x{T}, torch threads {torch.get_num_threads()}")
    print(table(rows, ["model", "kv_mode", "fwd+bwd s", "time ratio", "time theory", "kv entries", "kv ratio",
                       "kv theory"]))
    headline = {"time_ratio": rows[1]["time ratio"], "kv_ratio_recursion_wise": rows[1]["kv ratio"],
                "kv_ratio_shared": rows[2]["kv ratio"], "time_ratio_shared": rows[2]["time ratio"]}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, shape={"d_model": d, "batch": B, "seq_len": T, "n_layers": 32})


if __name__ == "__main__":
    main()
