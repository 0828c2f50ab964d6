"""Every YAML under configs/ parses and instantiates (model, data module, trainer).

The stage configs stream a prepared web corpus (data.prepared: data/fineweb-edu-smollm, made online by
`haipai prepare`): here a tiny prepared KJV directory stands in for it, and `--data.prepared null`
(their documented offline stand-in) trains on the bundled KJV.
"""

from pathlib import Path

import pytest
import yaml

from haipai_lightning.cli.main import run_cli
from haipai_lightning.train.module import MoRLightningModule

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from datamodules.prepare import prepare

    d = str(tmp_path_factory.mktemp("prepared") / "corpus")
    prepare(source="kjv", out=d, vocab_size=300, bpe_sample_mb=0.1, max_documents=20)
    return d


def _streams(path):
    return bool((yaml.safe_load(Path(path).read_text()).get("data") or {}).get("prepared"))


def test_there_are_configs():
    names = {Path(c).name for c in CONFIGS}
    assert {"quickstart.yaml", "stage1.yaml", "growth.yaml", "stage2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).name)
def test_config_instantiates(path, tmp_path, prepared):
    data = ["--data.prepared", prepared] if _streams(path) else []
    cli = run_cli(["--config", path, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", *data],
                  run=False)
    assert (cli.datamodule.stream is not None) == bool(data)
    assert isinstance(cli.model, MoRLightningModule)
    n = cli.model.model.num_parameters()
    assert n["effective"] >= n["unique"] > 0
    # the CLI links the tokenizer size to the embedding
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size


def test_stage1_is_the_planned_scale():
    stage1 = [c for c in CONFIGS if c.endswith("stage1.yaml")][0]
    assert yaml.safe_load(Path(stage1).read_text())["data"]["prepared"] == "data/fineweb-edu-smollm"
    cli = run_cli(["--config", stage1, "--trainer.logger", "false", "--data.prepared", "null"], run=False)
    assert cli.datamodule.stream is None and cli.datamodule.source == "kjv"  # the offline stand-in
    n = cli.model.model.num_parameters()
    assert 150e6 <= n["unique"] <= 200e6, n  # configs/stage1.yaml: a 150-200M tiny MoR
    assert cli.model.config.n_recursions == 3 and cli.model.config.sharing == "middle_cycle"
    assert cli.trainer.precision == "bf16-mixed"
