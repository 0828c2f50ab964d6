"""Decode throughput: Haipai vanilla and MoR (trained routers, continuous depth-wise batching) vs transformers.

Arms, all at the same shape (d=384, 14 layers, 6 query / 3 KV heads, SwiGLU 1024, vocab 4096, the head
tied to the embedding in both libraries), timed in alternation in one run:

- `transformers`: Hugging Face `LlamaForCausalLM.generate` (greedy, its own KV cache) -- the peer;
- `vanilla`: Haipai's `generate` on a 14-layer dense stack (the `StaticDecoder` fast path: static KV
  buffers, fused projections);
- `vanilla (general)`: the same model through the general cached forward (`generate(fast=False)`),
  the path every routed model takes -- what the fast path is measured against;
- `MoR EC Nr=2/3/4`: expert-choice MoR (middle-cycle) through `Engine`. Its routers are **trained**
  first: a few hundred steps on the bundled King James Bible with every other weight frozen, on the
  routers' own BCE loss (the auxiliary loss that teaches the causal 0.5 threshold to reproduce
  training's top-k), so that inference depths follow the configured capacities (1, 3/4, 1/2, 1/4
  for Nr=4). The checkpoint is cached under .haipai_cache/. The realised layers/token are printed.

Batches: 1, a fixed batch, and the largest batch whose KV cache fits a stated budget (vanilla /
transformers: the static buffer, max_len positions per layer; MoR: the bytes its caches hold,
i.e. paged storage). Each run serves queue x batch requests (batch 1: 2) (static batches for vanilla and
transformers; the engine refills its slots from its queue).

The machine's read bandwidth is measured in the same run (a 256 MiB fp32 buffer streamed by a sum
and by a GEMV; the faster counts), and `batch1_fraction_of_bandwidth_bound` = weight bytes read per
token x vanilla's batch-1 tokens/s / that bandwidth.

    python benchmarks/decode_throughput.py [--quick] [--threads 1] [--cpu_time] [--profile] [--json out.json]

--cpu_time times CPU seconds of this process (use with --threads 1 on a machine shared by other jobs).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import alternate, forever, parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.decode.engine import Engine  # noqa: E402
from haipai_lightning.decode.generate import generate  # noqa: E402
from haipai_lightning.decode.sampling import SamplingConfig  # noqa: E402
from haipai_lightning.decode.static import StaticDecoder  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.model.routing.base import FullRecursion  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402

QUEUE = 2  # requests per run = QUEUE x batch (batch 1: 2 requests); --queue to change
N_LAYERS = 14


def model_config(nr: int, d: int, V: int, max_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=d, n_layers=N_LAYERS, n_heads=max(4, d // 64), n_kv_heads=max(2, d // 128),
                       ffn_hidden=int(8 * d / 3), max_seq_len=max_len, n_recursions=nr, sharing="middle_cycle")


def build(nr: int, d: int, V: int, max_len: int) -> HaipaiModel:
    torch.manual_seed(0)
    return HaipaiModel(model_config(nr, d, V, max_len), router=FullRecursion if nr == 1 else ExpertChoiceRouter).eval()


def train_routers(m: HaipaiModel, V: int, steps: int, tag: str) -> dict:
    """Train only the routers on KJV with their BCE loss (rest frozen); cached by shape and steps."""
    from datamodules import TextDataModule  # the corpus is only needed here

    cache = Path(".haipai_cache") / "decode_throughput" / f"{tag}_{steps}.pt"
    if cache.exists():
        m.router.load_state_dict(torch.load(cache, weights_only=True))
        return {"router_steps": steps, "cached": True}
    seq = min(64, m.cfg.max_seq_len - 1)  # the sequences decoded here are no longer
    dm = TextDataModule(source="kjv", seq_len=seq, batch_size=8, vocab_size=V, max_documents=400)
    dm.prepare_data()
    dm.setup("fit")
    for p in m.parameters():
        p.requires_grad_(False)
    params = list(m.router.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    it, t0, m_train = forever(dm), time.perf_counter(), m.train()
    for _, b in zip(range(steps), it):
        out = m_train(b["input_ids"])
        loss = sum(v for rec in out.records for k, v in rec.aux_losses.items() if k == "bce")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.router.state_dict(), cache)
    return {"router_steps": steps, "cached": False, "train_s": time.perf_counter() - t0, "final_bce": float(loss)}


def llama_peer(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                     attn_implementation="sdpa")
    return LlamaForCausalLM(hf).eval()


def read_bandwidth(reps: int = 3, clock=time.perf_counter) -> dict[str, float]:
    """Bytes/s this machine streams from memory at the current thread count (256 MiB, beyond any cache)."""
    buf = torch.randn(2**26)  # 256 MiB fp32
    mat, x = buf.view(-1, 4096), torch.randn(1, 2**26 // 4096)
    out = {}
    for name, f in (("sum", lambda: buf.sum()), ("gemv", lambda: x @ mat)):
        f()
        best = min(_timed(f, clock) for _ in range(reps))
        out[name] = buf.numel() * 4 / best
    return out


def _timed(f, clock) -> float:
    t0 = clock()
    f()
    return clock() - t0


def weight_bytes_per_token(m: HaipaiModel) -> int:
    """Bytes of weights a batch-1 decode step reads: every layer application's weights (a shared layer is
    read at each application, no cache holds 100 MB), the final norm, the head; one embedding row."""
    per_layer = [sum(p.numel() * p.element_size() for p in m.layers[i].parameters()) for i, _ in m.order]
    head = m.head.weight.numel() * m.head.weight.element_size()
    return sum(per_layer) + head + m.norm.weight.numel() * 4 + m.cfg.d_model * 4


def kv_bytes_per_seq(m: HaipaiModel, V: int, length: int) -> float:
    cache = m.new_cache(length)
    with torch.no_grad():
        m(torch.randint(0, V, (4, length)), cache=cache)
    return cache.nbytes() / 4


def profile_step(m: HaipaiModel, V: int, P: int, steps: int = 20) -> str:
    """torch.profiler's self-CPU table of `steps` batch-1 decode steps of the static path: where the time goes."""
    from torch.profiler import profile

    steps = min(steps, m.cfg.max_seq_len - P - 4)
    dec = StaticDecoder(m, 1, P + steps + 4)
    with torch.no_grad():
        nxt = dec.prefill(torch.randint(0, V, (1, P))).argmax(-1, keepdim=True)
        for _ in range(3):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
        with profile() as prof:
            for _ in range(steps):
                nxt = dec.step(nxt).argmax(-1, keepdim=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table of vanilla's batch-1 step")
    p.add_argument("--cpu_time", action="store_true",
                   help="time by this process's CPU seconds (time.process_time), not wall time: for a machine shared "
                        "by other jobs; use with --threads 1")
    p.add_argument("--nrs", type=int, nargs="+", default=None, help="MoR recursion counts (default 2 3 4; quick 4)")
    p.add_argument("--queue", type=int, default=QUEUE, help="requests per run = queue x batch")
    p.add_argument("--reps", type=int, default=None, help="alternating timed runs per arm (default 2; quick 1)")
    p.add_argument("--router_steps", type=int, default=None, help="router training steps (default 150; quick 40)")
    args = p.parse_args()
    quick = args.quick
    d, V, P, new, fixed, budget_mib, cap, reps = ((256, 2048, 16, 12, 4, 4, 12, 1) if quick
                                                  else (384, 4096, 16, 48, 16, 32, 48, 2))
    reps = args.reps or reps
    steps = args.router_steps or (40 if quick else 150)
    max_len = P + new + 1
    nrs = sorted(args.nrs or ([4] if quick else [2, 3, 4]))
    models = {"vanilla": build(1, d, V, max_len)}
    train_info = {}
    for nr in nrs:
        m = build(nr, d, V, max_len)
        train_info[f"MoR EC Nr={nr}"] = train_routers(m, V, steps, f"ec_nr{nr}_d{d}_V{V}")
        models[f"MoR EC Nr={nr}"] = m
    peer = llama_peer(models["vanilla"].cfg)
    clock = time.process_time if args.cpu_time else time.perf_counter
    bw = read_bandwidth(clock=clock)
    bandwidth = max(bw.values())
    wbytes = weight_bytes_per_token(models["vanilla"])
    torch.manual_seed(1)
    per_seq = {k: kv_bytes_per_seq(m, V, max_len) for k, m in models.items()}
    vanilla_static_kv = N_LAYERS * 2 * models["vanilla"].cfg.kv_heads * models["vanilla"].cfg.head_dim * 4 * max_len
    per_seq["vanilla"] = per_seq["transformers"] = per_seq["vanilla (general)"] = vanilla_static_kv
    arms = ["transformers", "vanilla", "vanilla (general)", *[k for k in models if k != "vanilla"]]
    budget = budget_mib * 2**20
    batches = {"batch1": {k: 1 for k in arms}, "fixed": {k: fixed for k in arms},
               "max": {k: max(1, min(cap, int(budget // per_seq[k]))) for k in arms}}
    greedy = SamplingConfig(max_new_tokens=new, temperature=0)

    def run(k: str, prompts: torch.Tensor, B: int) -> float:
        """Serve the prompts; returns the layers each token ran."""
        if k == "transformers":
            for i in range(0, prompts.size(0), B):
                peer.generate(prompts[i:i + B], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
            return float(N_LAYERS)
        if k.startswith("vanilla"):
            for i in range(0, prompts.size(0), B):
                generate(models["vanilla"], prompts[i:i + B], greedy, fast=k == "vanilla")
            return float(N_LAYERS)
        m = models[k]
        e = Engine(m, max_batch=B, max_len=max_len)
        reqs = e.generate(prompts.tolist(), max_new_tokens=new)
        assert all(len(r) == new for r in reqs)
        sch = m.schedule
        return len(sch.prelude) + len(sch.coda) + e.stats["block_tokens"] / max(e.stats["tokens"], 1) * len(sch.shared)

    rows, tps, layers = [], {}, {}
    t_start = time.perf_counter()
    with torch.no_grad():
        for label, sizes in batches.items():
            n_req = {k: (2 if label == "batch1" else args.queue * B) for k, B in sizes.items()}
            prompts = {k: torch.randint(0, V, (n_req[k], P)) for k in arms}
            eff: dict[str, float] = {}

            def job(k):
                return lambda: eff.__setitem__(k, run(k, prompts[k], sizes[k]))

            secs = alternate({k: job(k) for k in arms}, reps, clock)  # the arms take turns: noise hits them alike
            for k in arms:
                tps[(k, label)] = n_req[k] * new / secs[k]
                layers[k] = eff[k]
                rows.append({"model": k, "batch": f"{label} {sizes[k]}", "tokens/s": tps[(k, label)],
                             "layers/token": eff[k], "KV KiB/seq": per_seq[k] / 1024})
            print(f"{label} done ({time.perf_counter() - t_start:.0f} s):",
                  {k: round(tps[(k, label)], 1) for k in arms}, flush=True)
            # written after each batch size, so a run that is stopped keeps what it measured
            write_json(args.json, {}, rows=rows, partial=True, read_bandwidth=bw, weight_bytes_per_token=wbytes)
    for r in rows:
        label = r["batch"].split()[0]
        r["vs vanilla"] = r["tokens/s"] / tps[("vanilla", label)]
        r["vs transformers"] = r["tokens/s"] / tps[("transformers", label)]
    print(f"d={d}, {N_LAYERS} layers (MoR: middle-cycle, routers trained {steps} steps), vocab {V}, prompt {P} + "
          f"{new} new tokens, greedy, KV budget {budget_mib} MiB (batch cap {cap}), torch threads "
          f"{torch.get_num_threads()}, median of {reps} alternating runs, "
          f"{'CPU seconds of this process' if args.cpu_time else 'wall time'}")
    print(f"read bandwidth: {', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bw.items())}; weights read per "
          f"token {wbytes / 1e6:.1f} MB -> batch-1 bound {bandwidth / wbytes:.1f} tokens/s")
    print(table(rows, ["model", "batch", "tokens/s", "vs vanilla", "vs transformers", "layers/token", "KV KiB/seq"]))
    nr_max = f"MoR EC Nr={nrs[-1]}"
    headline = {
        "vanilla_vs_transformers_batch1": tps[("vanilla", "batch1")] / tps[("transformers", "batch1")],
        "vanilla_vs_transformers_fixed_batch": tps[("vanilla", "fixed")] / tps[("transformers", "fixed")],
        "batch1_fraction_of_bandwidth_bound": wbytes * tps[("vanilla", "batch1")] / bandwidth,
        "speedup_fixed_batch": tps[(nr_max, "fixed")] / tps[("vanilla", "fixed")],
        "speedup_max_batch": tps[(nr_max, "max")] / tps[("vanilla", "max")],
        "speedup_max_batch_vs_general_vanilla": tps[(nr_max, "max")] / tps[("vanilla (general)", "max")],
        "fast_vs_general_vanilla_batch1": tps[("vanilla", "batch1")] / tps[("vanilla (general)", "batch1")],
        "layers_per_token": layers[nr_max],
    }
    for nr in nrs[:-1]:
        headline[f"speedup_max_batch_nr{nr}"] = tps[(f"MoR EC Nr={nr}", "max")] / tps[("vanilla", "max")]
        headline[f"speedup_fixed_batch_nr{nr}"] = tps[(f"MoR EC Nr={nr}", "fixed")] / tps[("vanilla", "fixed")]
        headline[f"layers_per_token_nr{nr}"] = layers[f"MoR EC Nr={nr}"]
    print("headline:", {k: round(v, 3) for k, v in headline.items()})
    if args.profile:
        print(profile_step(models["vanilla"], V, P))
    write_json(args.json, headline, rows=rows, kv_bytes_per_seq=per_seq, read_bandwidth=bw,
               weight_bytes_per_token=wbytes, routers=train_info, clock="cpu" if args.cpu_time else "wall",
               total_s=time.perf_counter() - t_start,
               goals={"vanilla_vs_transformers_batch1": 2.0, "vanilla_vs_transformers_fixed_batch": 1.2,
                      "batch1_fraction_of_bandwidth_bound": 0.6, "speedup_max_batch": 2.0})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
