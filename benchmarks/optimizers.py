"""Optimizers at equal steps: AdamW vs GaLore vs Q-GaLore (vs bitsandbytes 8-bit AdamW where it runs).

One model shape, the same initial weights and the same King James Bible batches for every
optimizer; the optimizers take their steps in alternation (step i of each, then step i+1),
so machine noise hits them alike. Reported: optimizer-state bytes (measured: every tensor in
the optimizer's state), median time of the optimizer step and of the whole train step, the
training loss over the last 10 steps and the validation loss after the same number of steps.
Also: activation checkpointing of the recursion blocks, the bytes autograd keeps for the
backward with and without it (measured by saved-tensor hooks) and the train-step time.

    python benchmarks/optimizers.py [--quick] [--json out.json] [--steps N]
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
from datamodules import TextDataModule  # noqa: E402
from haipai_lightning.config import ConfigError, ModelConfig  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.train.schedules import optimizer_state_bytes, param_groups  # noqa: E402
from haipai_lightning.train.optimizers import AdamW8bit, GaLoreAdamW, QGaLoreAdamW, check_bitsandbytes  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402


def loss_of(model: HaipaiModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["input_ids"])
    lm = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten())
    return lm + sum(out.aux_losses.values(), torch.zeros(()))


@torch.no_grad()
def val_loss(model: HaipaiModel, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    out = [F.cross_entropy(model(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten()).item() for b in batches]
    model.train()
    return sum(out) / len(out)


def saved_bytes(model: HaipaiModel, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, batch)
    return total[0]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    d, layers, seq, batch = (128, 5, 64, 8) if args.quick else (192, 8, 128, 8)
    steps = args.steps or (30 if args.quick else 120)
    rank, gap = d // 4, max(10, steps // 4)
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=batch, vocab_size=4096)
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    train = [next(it) for _ in range(steps)]
    val = [b for _, b in zip(range(8), dm.val_dataloader())]
    cfg = ModelConfig(vocab_size=4096, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden=int(8 * d / 3),
                      max_seq_len=seq, n_recursions=3, sharing="middle_cycle")
    optimizers = {
        "AdamW (fused)": functools.partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
        f"GaLore r={rank}": functools.partial(GaLoreAdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, rank=rank,
                                              update_proj_gap=gap, scale=1.0),
        f"Q-GaLore r={rank} INT4": functools.partial(QGaLoreAdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                                     rank=rank, update_proj_gap=gap, scale=1.0, proj_bits=4),
    }
    skipped = None
    try:
        check_bitsandbytes("cpu")
        optimizers["8-bit AdamW (bnb)"] = functools.partial(AdamW8bit, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    except ConfigError as e:
        skipped = str(e)
        print("8-bit AdamW skipped:", e)
    torch.manual_seed(0)
    init = HaipaiModel(cfg, router=ExpertChoiceRouter).state_dict()
    runs = {}
    for name, make in optimizers.items():
        model = HaipaiModel(cfg, router=ExpertChoiceRouter)
        model.load_state_dict(init)
        runs[name] = {"model": model, "opt": make(param_groups(model)), "losses": [], "step_s": [], "opt_s": []}
    for i, b in enumerate(train):
        for r in runs.values():  # alternate: step i of every optimizer
            t0 = time.perf_counter()
            loss = loss_of(r["model"], b)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            t1 = time.perf_counter()
            r["opt"].step()
            t2 = time.perf_counter()
            r["losses"].append(loss.item())
            r["step_s"].append(t2 - t0)
            r["opt_s"].append(t2 - t1)
        if i % 25 == 0:
            print(f"step {i}: " + ", ".join(f"{k} {r['losses'][-1]:.3f}" for k, r in runs.items()), flush=True)
    rows = []
    for name, r in runs.items():
        rows.append({"optimizer": name, "state bytes": optimizer_state_bytes(r["opt"]),
                     "opt step ms": 1e3 * statistics.median(r["opt_s"][1:]),
                     "train step ms": 1e3 * statistics.median(r["step_s"][1:]),
                     "train loss (last 10)": sum(r["losses"][-10:]) / 10, "val loss": val_loss(r["model"], val)})
    base = rows[0]["state bytes"]
    for row in rows:
        row["state ratio"] = row["state bytes"] / base
    n_params = sum(p.numel() for p in runs[next(iter(runs))]["model"].parameters())

    # activation checkpointing of the recursion blocks: memory kept for the backward, step time
    model = HaipaiModel(cfg, router=ExpertChoiceRouter)
    model.load_state_dict(init)
    ck_rows = []
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(7 if args.quick else 11):
        for flag in (False, True):
            model.activation_checkpointing = flag
            t0 = time.perf_counter()
            loss_of(model, train[0]).backward()
            times[flag].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    for flag in (False, True):
        model.activation_checkpointing = flag
        ck_rows.append({"activation checkpointing": "on" if flag else "off",
                        "saved activation bytes": saved_bytes(model, train[0]),
                        "fwd+bwd ms": 1e3 * statistics.median(times[flag][1:])})
    for row in ck_rows:
        row["bytes ratio"] = row["saved activation bytes"] / ck_rows[0]["saved activation bytes"]
        row["time ratio"] = row["fwd+bwd ms"] / ck_rows[0]["fwd+bwd ms"]

    print(f"\n{steps} steps, d={d}, {layers} layers middle-cycle Nr=3 expert-choice, {n_params} parameters, "
          f"batch {batch}x{seq}, King James Bible, BPE 4096, GaLore rank {rank}, refresh every {gap} steps")
    print(table(rows, ["optimizer", "state bytes", "state ratio", "opt step ms", "train step ms",
                       "train loss (last 10)", "val loss"]))
    print()
    print(table(ck_rows, ["activation checkpointing", "saved activation bytes", "bytes ratio", "fwd+bwd ms",
                          "time ratio"]))
    keys = {"AdamW": "adamw", "GaLore": "galore", "Q-GaLore": "qgalore", "8-bit": "adamw8bit"}
    headline = {}
    for row in rows:
        k = next(v for prefix, v in keys.items() if row["optimizer"].startswith(prefix))
        headline[f"state_bytes_{k}"] = row["state bytes"]
        headline[f"val_loss_{k}"] = row["val loss"]
    headline["activation_bytes_ratio_checkpointing"] = ck_rows[1]["bytes ratio"]
    headline["time_ratio_checkpointing"] = ck_rows[1]["time ratio"]
    print("headline:", {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, checkpointing=ck_rows, steps=steps, n_params=n_params,
               skipped_8bit=skipped)


if __name__ == "__main__":
    main()
