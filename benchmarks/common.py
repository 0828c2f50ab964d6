"""Shared helpers for benchmarks: timing, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


class _Parser(argparse.ArgumentParser):
    def parse_args(self, *a: Any, **k: Any) -> argparse.Namespace:  # type: ignore[override]
        args = super().parse_args(*a, **k)
        if args.threads:
            torch.set_num_threads(args.threads)
        return args


def parser(doc: str) -> argparse.ArgumentParser:
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller run, about a minute on 2 cores")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). 1 keeps small-matmul timings stable on a busy machine")
    return p


def time_fn(fn: Callable[[], Any], warmup: int = 1, reps: int = 3) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate(fns: dict[str, Callable[[], Any]], reps: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each fn, run in alternation so machine noise hits them alike.
    clock: wall time by default; time.process_time counts this process's CPU seconds (an oversubscribed
    machine: with one torch thread, the time the work would take on an idle core)."""
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(path: str | None, headline: dict[str, float], **rest: Any) -> None:
    if not path:
        return
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count()}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"headline": headline, "env": info, **rest}, f, indent=2)
    os.replace(tmp, path)


def forever(dm):
    """Training batches of a data module without end: epoch after epoch (a fresh shuffle each)."""
    while True:
        yield from dm.train_dataloader()

