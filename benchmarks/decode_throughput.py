"""Decode throughput: MoR (expert-choice, continuous depth-wise batching) vs a vanilla Transformer.

Same layer shape (14 effective layers); vanilla decodes a static batch with a KV cache;
MoR Nr=3 / Nr=4 (middle-cycle) decode through `Engine` (tokens at different recursion depths
share one pass of the shared block; early exits free their slot at once). Routers are not
trained here: an untrained expert-choice gate passes about half of the tokens at each step
with capacity < 1, so the layers each token actually ran are measured and printed
("layers/token"; vanilla runs all 14). Batches: a fixed one, and the largest whose KV cache fits a
stated memory budget (KV bytes per sequence measured from the caches, i.e. assuming paged
KV storage that holds only the entries written). Each run serves 4 x batch requests: vanilla in
static batches of `batch`, the engine with `batch` slots refilled from its queue.

    python benchmarks/decode_throughput.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import alternate, parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.decode.engine import Engine  # noqa: E402
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.base import FullRecursion  # noqa: E402


QUEUE = 4  # requests per run = QUEUE x batch: continuous batching refills slots from a queue, as served


def build(nr: int, d: int, V: int, max_len: int) -> HaipaiModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=14, n_heads=max(4, d // 64), n_kv_heads=max(2, d // 128),
                      ffn_hidden=int(8 * d / 3), max_seq_len=max_len, n_recursions=nr, sharing="middle_cycle")
    return HaipaiModel(cfg, router=FullRecursion if nr == 1 else ExpertChoiceRouter)


def kv_bytes_per_seq(m: HaipaiModel, V: int, length: int) -> float:
    cache = m.new_cache(length)
    with torch.no_grad():
        m(torch.randint(0, V, (4, length)), cache=cache)
    return cache.nbytes() / 4


def run_vanilla(m, prompts, new, B):
    for i in range(0, prompts.size(0), B):  # static batching: B requests at a time
        generate(m, prompts[i : i + B], SamplingConfig(max_new_tokens=new, temperature=0))
    return 14.0


def run_engine(m, prompts, new, B):
    e = Engine(m, max_batch=B, max_len=m.cfg.max_seq_len)  # B slots, the rest of the requests queue
    reqs = e.generate(prompts.tolist(), max_new_tokens=new)
    assert all(len(r) == new for r in reqs)
    sch = m.schedule
    depth = e.stats["block_tokens"] / max(e.stats["tokens"], 1)  # shared-block passes per token
    return len(sch.prelude) + len(sch.coda) + depth * len(sch.shared)


def main() -> None:
    args = parser(__doc__).parse_args()
    d, V, P, new, fixed, budget_mib, cap, reps = ((256, 2048, 16, 16, 8, 8, 32, 2) if args.quick
                                                  else (384, 4096, 16, 48, 16, 64, 128, 3))
    max_len = P + new + 1
    models = {"vanilla": build(1, d, V, max_len), "MoR EC Nr=3": build(3, d, V, max_len),
              "MoR EC Nr=4": build(4, d, V, max_len)}
    for m in models.values():
        m.eval()
    torch.manual_seed(1)
    per_seq = {k: kv_bytes_per_seq(m, V, max_len) for k, m in models.items()}
    budget = budget_mib * 2**20
    batches = {"fixed": {k: fixed for k in models},
               "max": {k: min(cap, int(budget // per_seq[k])) for k in models}}
    rows, tps = [], {}
    with torch.no_grad():
        for label, sizes in batches.items():
            prompts = {k: torch.randint(0, V, (QUEUE * B, P)) for k, B in sizes.items()}
            eff: dict[str, float] = {}

            def job(k):
                fn = run_vanilla if k == "vanilla" else run_engine
                return lambda: eff.__setitem__(k, fn(models[k], prompts[k], new, sizes[k]))

            # the three models take turns, so machine noise hits them alike
            secs = alternate({k: job(k) for k in models}, reps)
            for k in models:
                tps[(k, label)] = QUEUE * sizes[k] * new / secs[k]
                rows.append({"model": k, "batch": f"{label} {sizes[k]}", "tokens/s": tps[(k, label)],
                             "layers/token": eff[k], "KV KiB/seq": per_seq[k] / 1024})
    for r in rows:
        label = r["batch"].split()[0]
        r["speedup"] = r["tokens/s"] / tps[("vanilla", label)]
    print(f"d={d}, 14 layers (MoR: middle-cycle), vocab {V}, prompt {P} + {new} new tokens, greedy, "
          f"KV budget {budget_mib} MiB (batch cap {cap}), torch threads {torch.get_num_threads()}, "
          f"{QUEUE} x batch requests per run, median of {reps} alternating runs")
    print(table(rows, ["model", "batch", "tokens/s", "speedup", "layers/token", "KV KiB/seq"]))
    headline = {"speedup_fixed_batch": tps[("MoR EC Nr=4", "fixed")] / tps[("vanilla", "fixed")],
                "speedup_max_batch": tps[("MoR EC Nr=4", "max")] / tps[("vanilla", "max")],
                "speedup_fixed_batch_nr3": tps[("MoR EC Nr=3", "fixed")] / tps[("vanilla", "fixed")],
                "speedup_max_batch_nr3": tps[("MoR EC Nr=3", "max")] / tps[("vanilla", "max")]}
    print("headline:", {k: round(v, 3) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, kv_bytes_per_seq=per_seq)


if __name__ == "__main__":
    main()
