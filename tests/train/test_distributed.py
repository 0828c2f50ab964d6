"""Distributed: a 2-process DDP fit on CPU (gloo) trains, its loss falls, its ranks stay in sync."""

import json
import os
import subprocess
import sys
from pathlib import Path

from datamodules import TextDataModule

HERE = Path(__file__).parent


def test_ddp_two_cpu_processes(tmp_path):
    cache = str(tmp_path / "cache")
    TextDataModule(source="kjv", seq_len=32, batch_size=8, vocab_size=512, max_documents=60, val_fraction=0.05,
                   seed=3, cache_dir=cache).prepare_data()  # once, before the processes start
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_fit.py"), str(tmp_path), cache, "30"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    for r in ranks:
        losses = r["losses"]
        assert len(losses) == 30
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # it trains
    # the DistributedSampler gave the ranks different blocks; the gradient all-reduce kept them equal
    assert ranks[0]["first_rows"] != ranks[1]["first_rows"]
    assert abs(ranks[0]["checksum"] - ranks[1]["checksum"]) < 1e-6 * max(1.0, abs(ranks[0]["checksum"]))


FSDP = str(HERE.parents[1] / "configs" / "gpu" / "fsdp.yaml")


def test_fsdp_config_parses(capsys):
    """The whole file validates against the CLI (FSDPStrategy's arguments included), without a GPU."""
    import pytest

    from haipai_lightning.cli.main import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", FSDP, "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning.pytorch.strategies.FSDPStrategy" in printed and "FULL_SHARD" in printed


def test_fsdp_config_instantiates_its_model(tmp_path):
    from haipai_lightning.cli.main import run_cli

    # Lightning refuses FSDP on a CPU accelerator, so the trainer gets the default strategy here
    cli = run_cli(["--config", FSDP, "--trainer.strategy", "auto", "--trainer.precision", "32-true",
                   "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.model.model.activation_checkpointing
    assert 150e6 <= cli.model.model.num_parameters()["unique"] <= 200e6
