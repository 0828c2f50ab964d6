"""Load test of `haipai serve`: an MoR model vs a vanilla Transformer of the same layer shape, served the same way.

Both models (14 layers; MoR: expert-choice Nr=4, middle-cycle; vanilla: Nr=1) are built untrained from a
config, saved as Haipai checkpoints with the legacy fixture's BPE tokenizer in a temp dir, and served by
real `haipai serve` processes on 127.0.0.1 (continuous depth-wise batching, --max_batch 16, --threads 1).
An untrained expert-choice gate lets about half of the tokens go on at each step, so the MoR model runs
fewer layers per token (as in benchmarks/decode_throughput.py; "depth" is its mean recursion depth).
The two servers take turns under load (rounds of a few seconds), so machine noise hits them alike.

The load: 32 closed-loop clients, each waiting an exponential think time (Poisson arrivals, mean 0.1 s)
before each request, for a fixed duration: twice as many clients as slots, so the servers run saturated
(16 requests decode, the rest wait in the queue) and output tokens/s measures their capacity; prompts of 4-32 token ids and 8-64 output tokens drawn from a seeded RNG,
so both servers get the same request sequence per client. Requests stream (time to first token) with
ignore_eos (outputs run to max_tokens) and temperature 0.8. After the duration no new request starts;
requests still running after a grace period count as lost. Errors: any non-200 answer, error chunk or
exception. Server RSS is read from /proc after a warm-up and at the end.

    python benchmarks/serve_load.py [--quick] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parser, table, write_json  # noqa: E402
from haipai_lightning.config import ModelConfig  # noqa: E402
from haipai_lightning.io.arch import arch_of  # noqa: E402
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file  # noqa: E402
from haipai_lightning.model.decoder import HaipaiModel  # noqa: E402
from haipai_lightning.model.routing.base import FullRecursion  # noqa: E402
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter  # noqa: E402
from haipai_lightning.serve.metrics import scrape  # noqa: E402

CLIENTS, MAX_BATCH, MAX_QUEUE = 32, 16, 64
PROMPT_LEN, OUTPUT_LEN = (4, 32), (8, 64)
LEGACY = ROOT / "tests" / "fixtures" / "legacy" / "ec_mod.ckpt"


def save_model(nr: int, d: int, path: Path, tokenizer_json: str, vocab: int) -> tuple[int, int]:
    """Build and save an untrained model; returns (unshared layers, layers of the shared block)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=14, n_heads=max(4, d // 64), n_kv_heads=max(2, d // 128),
                      ffn_hidden=int(8 * d / 3), max_seq_len=PROMPT_LEN[1] + OUTPUT_LEN[1], n_recursions=nr,
                      sharing="middle_cycle")
    m = HaipaiModel(cfg, router=FullRecursion if nr == 1 else ExpertChoiceRouter)
    ckpt = {CHECKPOINT_KEY: {"arch": arch_of(m), "growth": [], "tokenizer": tokenizer_json},
            "state_dict": {"model." + k: v for k, v in m.state_dict().items()}}
    torch.save(ckpt, path)
    return len(m.schedule.prelude) + len(m.schedule.coda), len(m.schedule.shared)


def start(ckpt: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "haipai_lightning.cli.main"]
    with open(log, "wb") as err:
        proc = subprocess.Popen([*cmd, "serve", "--ckpt_path", str(ckpt), "--host", "127.0.0.1", "--port", "0",
                                 "--max_batch", str(MAX_BATCH), "--max_queue", str(MAX_QUEUE), "--threads",
                                 str(threads), "--model_name", "m", "--log_level", "warning"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    out, deadline = b"", time.monotonic() + 180
    while b"\n" not in out:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"haipai serve did not start:\n{log.read_text()[-2000:]}")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            out += os.read(proc.stdout.fileno(), 4096)
    return proc, out.decode().split()[2].removesuffix("/v1")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024


async def one(http, url: str, prompt: list[int], max_tokens: int, seed: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - t0
                elif not chunk["choices"]:
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 -- counted, reported
        return {"error": f"{type(e).__name__}: {e}"}
    if error or tokens != max_tokens:
        return {"error": error or f"{tokens} of {max_tokens} tokens"}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


async def load(url: str, duration: float, rate: float, grace: float, vocab: int, seed: int) -> dict:
    """CLIENTS closed-loop clients with exponential think times (mean 1 / rate) for `duration` seconds."""
    import httpx

    results: list[dict] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as http:
        t0 = time.perf_counter()
        end = t0 + duration

        async def client(c: int) -> None:
            rng = random.Random(1000 * seed + c)  # the same request sequence for both servers
            while True:
                await asyncio.sleep(rng.expovariate(rate))
                if time.perf_counter() >= end:
                    return
                prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*PROMPT_LEN))]
                results.append(await one(http, url, prompt, rng.randint(*OUTPUT_LEN), rng.randrange(2**31)))

        tasks = [asyncio.create_task(client(c)) for c in range(CLIENTS)]
        done, pending = await asyncio.wait(tasks, timeout=duration + grace)
        for t in pending:  # still running past the grace period: lost
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    return {"results": results, "lost": len(pending), "wall": wall}


def pct(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def summarize(name: str, runs: list[dict], url: str, shape: tuple[int, int], rss: tuple[float, float]) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        m = scrape(r.read().decode())
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall"] for run in runs)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        print(f"{name}: {len(errors)} errors, e.g. {errors[:3]}", file=sys.stderr)
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    depth = m.get("haipai_mean_recursion_depth", float("nan"))
    return {"model": name, "requests": len(ok), "req/s": len(ok) / wall,
            "out tok/s": sum(r["tokens"] for r in ok) / wall, "p50 s": pct(lat, 50), "p99 s": pct(lat, 99),
            "TTFT p50 s": pct(ttft, 50), "TTFT p99 s": pct(ttft, 99), "errors": len(errors),
            "lost": sum(run["lost"] for run in runs), "depth": depth, "layers/token": shape[0] + shape[1] * depth,
            "occupancy": m["haipai_engine_busy_slots_total"] / max(m["haipai_engine_ticks_total"], 1) / MAX_BATCH,
            "RSS MiB start": rss[0], "RSS MiB end": rss[1]}


def main() -> None:
    args = parser(__doc__).parse_args()
    # rounds x seconds of load per model, the two servers taking turns so machine noise hits them alike
    d, rounds, seconds, rate = (128, 2, 6.0, 10.0) if args.quick else (256, 4, 15.0, 10.0)
    threads = args.threads or 1
    tok_json = load_checkpoint_file(LEGACY)[CHECKPOINT_KEY]["tokenizer"]
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    rows = []
    with tempfile.TemporaryDirectory(prefix="haipai-serve-load-") as tmp:
        servers, shapes = {}, {}
        for name, nr in (("vanilla", 1), ("MoR EC Nr=4", 4)):
            ckpt = Path(tmp) / f"nr{nr}.ckpt"
            shapes[name] = save_model(nr, d, ckpt, tok_json, vocab)
            servers[name] = start(ckpt, threads, Path(tmp) / f"nr{nr}.log")  # both start (load) at once
        try:
            rss0, runs = {}, {name: [] for name in servers}
            for name, (proc, url) in servers.items():
                asyncio.run(load(url, 2.0, rate, 30, vocab, seed=0))  # warm-up: first calls, caches, allocator
                rss0[name] = rss_mib(proc.pid)
            for k in range(rounds):
                for name, (proc, url) in servers.items():  # one at a time under load; the other idles
                    runs[name].append(asyncio.run(load(url, seconds, rate, 30, vocab, seed=k + 1)))
            for name, (proc, url) in servers.items():
                rows.append(summarize(name, runs[name], url, shapes[name], (rss0[name], rss_mib(proc.pid))))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(30) for proc, _ in servers.values()]
    by = {r["model"]: r for r in rows}
    for r in rows:
        r["vs vanilla"] = r["out tok/s"] / by["vanilla"]["out tok/s"]
    print(f"d={d}, 14 layers (MoR: middle-cycle), vocab {vocab}, {CLIENTS} clients, think time Exp(mean "
          f"{1 / rate:.2f} s), {rounds} x {seconds:.0f} s per model (alternating), prompts "
          f"{PROMPT_LEN[0]}-{PROMPT_LEN[1]} tokens, outputs {OUTPUT_LEN[0]}-{OUTPUT_LEN[1]} tokens, "
          f"--max_batch {MAX_BATCH}, server torch threads {threads}; "
          f"exit codes after SIGTERM {codes}")
    print(table(rows, ["model", "requests", "req/s", "out tok/s", "vs vanilla", "p50 s", "p99 s", "TTFT p50 s",
                       "TTFT p99 s", "errors", "lost", "depth", "layers/token", "occupancy", "RSS MiB start",
                       "RSS MiB end"]))
    mor = by["MoR EC Nr=4"]
    headline = {"mor_vs_vanilla_tokens_per_s": mor["vs vanilla"],
                "errors": float(sum(r["errors"] for r in rows)),
                "lost": float(sum(r["lost"] for r in rows)),
                "p99_latency_s": mor["p99 s"],
                "rss_growth": max(r["RSS MiB end"] / r["RSS MiB start"] - 1 for r in rows)}
    print("headline:", {k: round(v, 3) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, exit_codes=codes)


if __name__ == "__main__":
    main()
