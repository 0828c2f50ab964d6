"""Data at scale (issue #16): does `haipai prepare` + StreamingDataModule run at constant memory?

Two synthetic corpora 8x apart in size (JSON lines of Zipf-distributed pseudo-words, generated
deterministically, never held in memory). Each measurement runs in a fresh subprocess and reports its
peak RSS (the process and its worker processes, ru_maxrss):
  * prepare: tokenize the corpus into shards with --workers (one fixed tokenizer.json for both sizes,
    trained once on the small corpus, so only the tokenization and writing are measured);
  * train loader: one full epoch of StreamingDataModule (seq_len 256, batch 16) with 1 loader worker
    while the main process runs a fixed 10 ms matmul loop per batch as a stand-in for a training step
    (a short step: the harshest case for the loader; column wait_10ms_step);
  * quickstart steps: `haipai fit --config configs/quickstart.yaml --data.prepared <large>`'s model and
    data module (batch 16 x 128, 1 loader worker), real forward + backward + AdamW steps (--steps),
    timing how long each step waits for its batch: loader_wait_fraction.
Throughput: prepare MB/s of text on the large corpus vs `tokenizers` encode_batch alone on the same
text (in memory, all threads), the issue's reference; encode_batch_fast (the same ids without
character offsets, which prepare uses) is printed beside it as the peer bound.

Headline: rss_ratio_prepare and rss_ratio_train (peak RSS large / small; 1.0 = constant memory),
prepare_mb_per_s, prepare_vs_encode_batch (prepare MB/s / encode_batch MB/s) and loader_wait_fraction
(share of the loop's time spent waiting for the next batch).

    python benchmarks/data_scale.py [--quick] [--json out.json] [--workers 2]   (--quick: about a minute)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parser, table, write_json  # noqa: E402

STEP_S = 0.01  # the stand-in training step; a real CPU step here (d=256, batch 16x256) takes ~1.7 s
CHILD = r"""
import json, resource, sys, time
STEP_S = {step}
sys.path.insert(0, {root!r})
mode, args = sys.argv[1], json.loads(sys.argv[2])
out = {{}}
if mode == "prepare":
    from datamodules.prepare import prepare
    t0 = time.perf_counter()  # after the imports: the time of the work itself
    ix = prepare(**args)
    out["tokens"] = ix["n_tokens"]["train"] + ix["n_tokens"]["val"]
elif mode == "step":  # the quickstart's model and batch shape, real training steps, streamed data
    import torch
    import torch.nn.functional as F
    from haipai_lightning.cli.main import run_cli
    torch.set_num_threads(1)
    cli = run_cli(["--config", {root!r} + "/configs/quickstart.yaml", "--data.prepared", args["prepared"],
                   "--data.vocab_size", "null", "--data.num_workers", "1", "--trainer.logger", "false"], run=False)
    model, dm = cli.model.model, cli.datamodule
    dm.setup("fit")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = iter(dm.train_dataloader())
    wait, n, t0 = 0.0, 0, None
    for i in range(args["steps"] + 2):
        if i == 2:  # the first steps warm the allocator and start the worker
            wait, t0 = 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        o = model(batch["input_ids"])
        loss = F.cross_entropy(o.logits.flatten(0, 1), batch["labels"].flatten()) + sum(o.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.update(steps=args["steps"], wait=wait)
else:
    import torch
    from datamodules import StreamingDataModule
    torch.set_num_threads(1)
    dm = StreamingDataModule(args["prepared"], seq_len=256, batch_size=16, num_workers=1)
    dm.setup("fit")
    a, b = torch.randn(160, 160), torch.randn(160, 160)
    t0 = time.perf_counter()
    wait, n, it = 0.0, 0, iter(dm.train_dataloader())
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        n += 1
        end = time.perf_counter() + STEP_S
        while time.perf_counter() < end:  # the stand-in training step
            a @ b
    out.update(batches=n, wait=wait)
out["seconds"] = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
out["peak_rss_mb"] = max(me.ru_maxrss, kids.ru_maxrss) / 1024
print("RESULT " + json.dumps(out))
"""


def child(mode: str, **args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), step=STEP_S), mode, json.dumps(args)],
                       capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def make_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """~mb MB of JSON lines, 2-6 KB documents of Zipf-distributed pseudo-words; written in pieces."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(20_000)]
    target, written = int(mb * 2**20), 0
    with open(path, "w") as f:
        while written < target:
            ids = np.minimum(rng.zipf(1.3, size=int(rng.integers(400, 1000))), len(words)) - 1
            line = json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n"
            f.write(line)
            written += len(line)


def encode_batch_mb_per_s(corpus: Path, tokenizer: Path, fast: bool = False) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    docs = [json.loads(line)["text"] for line in open(corpus)]
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    t0 = time.perf_counter()
    for i in range(0, len(docs), 1000):
        encode(docs[i : i + 1000], add_special_tokens=False)
    return sum(len(d.encode()) for d in docs) / 2**20 / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--workers", type=int, default=2, help="prepare worker processes")
    p.add_argument("--steps", type=int, default=None, help="quickstart training steps timed for loader_wait_fraction")
    args = p.parse_args()
    small = 3.0 if args.quick else 16.0
    args.steps = args.steps or (20 if args.quick else 100)
    sizes = {"small": small, "large": 8 * small}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, mb in sizes.items():
            make_corpus(tmp / f"{name}.jsonl", mb, seed=len(name))
        child("prepare", source=str(tmp / "small.jsonl"), out=str(tmp / "tok"), vocab_size=4096, bpe_sample_mb=2.0,
              max_documents=200)
        tok = tmp / "tok" / "tokenizer.json"
        rows = []
        for name, mb in sizes.items():
            real_mb = (tmp / f"{name}.jsonl").stat().st_size / 2**20
            prep = child("prepare", source=str(tmp / f"{name}.jsonl"), out=str(tmp / name), tokenizer=str(tok),
                         workers=args.workers, shard_tokens=1 << 22)
            train = child("train", prepared=str(tmp / name))
            if name == "large":
                step = child("step", prepared=str(tmp / name), steps=args.steps)
            rows.append({"corpus": name, "MB": real_mb, "tokens": prep["tokens"], "prepare_s": prep["seconds"],
                         "prepare_MB/s": real_mb / prep["seconds"], "prepare_peak_rss_MB": prep["peak_rss_mb"],
                         "epoch_batches": train["batches"], "epoch_s": train["seconds"],
                         "wait_10ms_step": train["wait"] / train["seconds"], "train_peak_rss_MB": train["peak_rss_mb"]})
        enc = encode_batch_mb_per_s(tmp / "small.jsonl", tok)
        enc_fast = encode_batch_mb_per_s(tmp / "small.jsonl", tok, fast=True)
    s, l = rows
    headline = {
        "rss_ratio_prepare": l["prepare_peak_rss_MB"] / s["prepare_peak_rss_MB"],
        "rss_ratio_train": l["train_peak_rss_MB"] / s["train_peak_rss_MB"],
        "prepare_mb_per_s": l["prepare_MB/s"],
        "prepare_vs_encode_batch": l["prepare_MB/s"] / enc,
        "loader_wait_fraction": step["wait"] / step["seconds"],
    }
    print(table(rows, list(rows[0])))
    print(f"encode_batch alone (in memory, all threads): {enc:.2f} MB/s; encode_batch_fast: {enc_fast:.2f} MB/s "
          f"(prepare: {l['prepare_MB/s'] / enc_fast:.2f}x of it)")
    print(f"quickstart training steps on the large corpus: {step['seconds'] / step['steps']:.3f} s/step, "
          f"{step['wait'] / step['steps'] * 1e3:.2f} ms/step waiting for data")
    print("headline:", {k: round(v, 4) for k, v in headline.items()})
    write_json(args.json, headline, rows=rows, encode_batch_mb_per_s=enc, encode_batch_fast_mb_per_s=enc_fast,
               quickstart_step_s=step["seconds"] / step["steps"], workers=args.workers,
               sizes_mb=sizes)


if __name__ == "__main__":
    main()
