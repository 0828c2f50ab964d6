"""MoE top-2 of 8 vs a dense SwiGLU of equal active parameters: train step time, in one run.

The MoE's experts have hidden H/2, so a token's two experts hold exactly the dense MLP's
parameters (H); the MoE adds a router (D x 8) and the dispatch: sort by expert, gather,
one matmul per expert slice (or torch._grouped_mm), weighted index_add back.

Two levels, each timed dense / MoE alternately (median of the repetitions):
  - model: a Llama-style decoder (d=256, 4 layers, vocab 8192, batch 8 x 256), forward +
    backward + AdamW step -- the headline `time_ratio` (goal <= 1.3);
  - MLP layer alone on the same tokens, forward + backward, with each dispatch path.

    python benchmarks/moe_dispatch.py [--quick] [--json out.json]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import alternate, parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.model.mlps import SwiGLU, TokenChoiceMoE  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()  # --threads is handled by the common parser
    d, H, B, T, reps = (256, 768, 4, 256, 5) if args.quick else (256, 768, 8, 256, 11)
    cfg = ModelConfig(vocab_size=8192, d_model=d, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=H,
                      max_seq_len=T, n_recursions=1)
    moe = functools.partial(TokenChoiceMoE, n_experts=8, top_k=2, expert_hidden=H // 2)
    torch.manual_seed(0)
    x = torch.randint(0, 8192, (B, T + 1))

    # ------------------------------------------------------------------ model
    def model_step(m: HaipaiModel, opt: torch.optim.Optimizer):
        def step():
            out = m(x[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + sum(out.aux_losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    models = {"dense": HaipaiModel(cfg), "moe": HaipaiModel(cfg, mlp=moe)}
    steps = {k: model_step(m, torch.optim.AdamW(m.parameters(), lr=1e-3)) for k, m in models.items()}
    mt = alternate(steps, reps)
    active = {k: sum(p.numel() for p in m.layers[0].mlp.parameters()) for k, m in models.items()}
    active["moe"] = 2 * active["moe"] // 8 + d * 8  # two experts of eight + the router
    rows = [{"level": "model", "mlp": "dense SwiGLU H=768", "active MLP params": active["dense"], "s/step": mt["dense"],
             "tokens/s": B * T / mt["dense"], "ratio": 1.0},
            {"level": "model", "mlp": "MoE top-2 of 8, H=384", "active MLP params": active["moe"], "s/step": mt["moe"],
             "tokens/s": B * T / mt["moe"], "ratio": mt["moe"] / mt["dense"]}]

    # ------------------------------------------------------------ MLP layer
    xl = torch.randn(B, T, d)
    layers = {"dense": SwiGLU(cfg), "moe loop": moe(cfg, dispatch="loop"),
              "moe grouped_mm": moe(cfg, dispatch="grouped_mm")}

    def layer_step(layer):
        def step():
            layer(xl).sum().backward()
            layer.zero_grad(set_to_none=True)
        return step

    lt = alternate({k: layer_step(v) for k, v in layers.items()}, reps)
    for k in ("dense", "moe loop", "moe grouped_mm"):
        rows.append({"level": "MLP layer", "mlp": k, "active MLP params": active["dense" if k == "dense" else "moe"],
                     "s/step": lt[k], "tokens/s": B * T / lt[k], "ratio": lt[k] / lt["dense"]})
    print(f"d={d}, batch {B}x{T}, train step = forward + backward (+ AdamW for the model), "
          f"median of {reps}, torch threads {torch.get_num_threads()}")
    print(table(rows, ["level", "mlp", "active MLP params", "s/step", "tokens/s", "ratio"]))
    headline = {"time_ratio": rows[1]["ratio"],
                "mlp_time_ratio": min(lt["moe loop"], lt["moe grouped_mm"]) / lt["dense"]}
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, shape={"d_model": d, "ffn_hidden": H, "batch": B, "seq_len": T})


if __name__ == "__main__":
    main()
