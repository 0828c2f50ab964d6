"""Every YAML under configs/ parses and instantiates (model, data module, trainer)."""

from pathlib import Path

import pytest

from haipai_lightning.cli.main import run_cli
from haipai_lightning.train.module import MoRLightningModule

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {Path(c).name for c in CONFIGS}
    assert {"quickstart.yaml", "stage1.yaml", "growth.yaml", "stage2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
def test_config_instantiates(path, tmp_path):
    cli = run_cli(["--config", path, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
                  run=False)
    assert isinstance(cli.model, MoRLightningModule)
    n = cli.model.model.num_parameters()
    assert n["effective"] >= n["unique"] > 0
    # the CLI links the tokenizer size to the embedding
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size


def test_stage1_is_the_planned_scale():
    cli = run_cli(["--config", [c for c in CONFIGS if c.endswith("stage1.yaml")][0], "--trainer.logger", "false"],
                  run=False)
    n = cli.model.model.num_parameters()
    assert 150e6 <= n["unique"] <= 200e6, n  # configs/stage1.yaml: a 150-200M tiny MoR
    assert cli.model.config.n_recursions == 3 and cli.model.config.sharing == "middle_cycle"
    assert cli.trainer.precision == "bf16-mixed"
