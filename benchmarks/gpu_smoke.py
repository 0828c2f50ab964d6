"""GPU smoke test at the real scale (issue #16): the stage-1 model trained a few hundred steps on one GPU.

What anyone runs first when a GPU is at hand. It builds configs/stage1.yaml's model through the CLI
(the ~165M-unique-parameter middle-cycle MoR, expert-choice routing, MoD, torch.compile as the config
says), trains it with Lightning in bf16-mixed for ``--steps`` micro-batches of ``--batch_size`` x 2048
tokens (flash-attn's kernel is used by the attention mixer whenever `flash_attn` imports), and reports

    tokens_per_s      training tokens per second after the first ``--warmup`` steps (compilation)
    mfu               model FLOPs per second / the GPU's dense bf16 datasheet peak (when the device is
                      known) -- model FLOPs from haipai_lightning.analysis.flops.training_flops at the
                      routers' nominal capacities (3 x forward matmul FLOPs, attention included)
    mfu_vs_matmul     the same against a bf16 8192^3 matmul timed in this run (the reachable peak)
    peak_memory_gib   torch.cuda.max_memory_allocated over the run
    loss_first / loss_last

Data: random tokens by default (throughput only); ``--prepared DIR`` streams a `haipai prepare`
directory instead (the real data path, e.g. data/fineweb-edu-smollm; the loss then falls).
Without CUDA it prints one line and exits 0. ``--cpu_dry_run`` runs the same code on the CPU with a
tiny shape for 3 steps, to check the script itself on a machine without a GPU.

    python benchmarks/gpu_smoke.py [--steps 300] [--batch_size 8] [--prepared DIR] [--json out.json]
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import parser, table, write_json  # noqa: E402

STAGE1 = str(ROOT / "configs" / "stage1.yaml")
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by a substring of the device name
DATASHEET_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
TINY = ["--model.config.d_model", "64", "--model.config.n_layers", "5", "--model.config.n_heads", "4",
        "--model.config.n_kv_heads", "2", "--model.config.ffn_hidden", "128", "--model.config.max_seq_len", "64",
        "--model.compile", "false", "--model.optimizer.init_args.fused", "false"]


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def matmul_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul FLOP/s measured here: what the GPU reaches on the best-case kernel."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def run(steps: int, batch_size: int, seq_len: int, warmup: int, prepared: str | None, dry: bool) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader, IterableDataset

    from datamodules import StreamingDataModule
    from haipai_lightning.analysis.flops import nominal_records, training_flops
    from haipai_lightning.cli.main import run_cli

    args = ["--config", STAGE1, "--data.prepared", "null", "--trainer.logger", "false", *(TINY if dry else [])]
    model = run_cli(args, run=False).model  # stage 1's module: model, router, optimizer, schedule, compile
    vocab = model.config.vocab_size

    class RandomTokens(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
                yield {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    class Random(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(RandomTokens(), batch_size=None, pin_memory=not dry)

    if prepared:
        data = StreamingDataModule(prepared, seq_len=seq_len, batch_size=batch_size, vocab_size=vocab, num_workers=2)
    else:
        data = Random()

    class Clock(L.Callback):
        def __init__(self):
            self.t0, self.t1, self.losses = None, None, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                if not dry:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            if not dry:
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(accelerator="cpu" if dry else "cuda", devices=1, precision="32-true" if dry else "bf16-mixed",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock])
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data)
    timed = steps - warmup
    tok_s = timed * batch_size * seq_len / (clock.t1 - clock.t0)
    net = model.model
    flops_tok = training_flops(net, nominal_records(net, batch_size, seq_len), batch_size, seq_len) / (batch_size * seq_len)
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    sheet = None if dry else datasheet_peak(name)
    measured = None if dry else matmul_peak("cuda")
    n = net.num_parameters()
    return {
        "device": name, "unique_params_M": n["unique"] / 1e6, "effective_params_M": n["effective"] / 1e6,
        "batch": f"{batch_size}x{seq_len}", "steps": steps, "compile": bool(model.hparams.get("compile")),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None, "data": prepared or "random tokens",
        "tokens_per_s": tok_s, "gflops_per_token": flops_tok / 1e9,
        "mfu": flops_tok * tok_s / sheet if sheet else None,
        "mfu_vs_matmul": flops_tok * tok_s / measured if measured else None,
        "matmul_tflops": measured / 1e12 if measured else None,
        "peak_memory_gib": None if dry else torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": clock.losses[0], "loss_last": clock.losses[-1],
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="steps not timed (torch.compile compiles in the first)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--prepared", default=None, help="a `haipai prepare` directory to stream instead of random tokens")
    p.add_argument("--cpu_dry_run", action="store_true", help="tiny shape, 3 steps on the CPU: checks the script")
    args = p.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device (torch {torch.__version__}); nothing measured -- run it on a GPU machine")
        write_json(args.json, {"cuda": False})
        return
    if dry:
        args.steps, args.warmup, args.batch_size, args.seq_len = 3, 1, 2, 32
    elif args.quick:
        args.steps = min(args.steps, 100)
    r = run(args.steps, args.batch_size, args.seq_len, args.warmup, args.prepared, dry)
    cols = ["device", "unique_params_M", "batch", "compile", "flash_attn", "tokens_per_s", "mfu", "mfu_vs_matmul",
            "peak_memory_gib", "loss_first", "loss_last"]
    print(table([r], cols))
    write_json(args.json, {k: r[k] for k in ("tokens_per_s", "mfu", "mfu_vs_matmul", "peak_memory_gib")}, run=r)


if __name__ == "__main__":
    main()
