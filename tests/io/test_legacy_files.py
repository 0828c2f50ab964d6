"""Files made by the flat layout (before the package was split) still load, to the same logits.

tests/fixtures/legacy/ holds a checkpoint (expert-choice MoR + Mixture-of-Depths), a grown
checkpoint (token-choice MoR, a Mamba layer, upcycled to MoE then Gstack-grown during the fit), an
export, and the logits each gave at that commit; their component specs name the old module paths.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import haipai_lightning
from haipai_lightning.cli.main import run_cli
from haipai_lightning.io.loader import load_model
from haipai_lightning.train.module import MoRLightningModule

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
REF = load_file(str(LEGACY / "logits.safetensors"))


@pytest.mark.parametrize("name", ["ec_mod", "grown_tc_moe_hybrid"])
def test_old_checkpoints_load_with_identical_logits(name):
    model, tok = load_model(str(LEGACY / f"{name}.ckpt"))
    assert tok is not None
    with torch.no_grad():
        logits = model(REF["input_ids"]).logits
    torch.testing.assert_close(logits, REF[name], rtol=0, atol=1e-6)


def test_old_checkpoint_names_old_paths_and_loads_through_the_module():
    ckpt = torch.load(LEGACY / "ec_mod.ckpt", weights_only=True)
    assert ckpt["haipai"]["arch"]["router"]["class_path"] == "haipai_lightning.routers.ExpertChoiceRouter"
    module = MoRLightningModule.load_from_checkpoint(LEGACY / "ec_mod.ckpt", weights_only=True)
    assert module.arch["router"]["class_path"] == "haipai_lightning.ExpertChoiceRouter"  # today's public name
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(REF["input_ids"]).logits, REF["ec_mod"], rtol=0, atol=1e-6)


def test_old_export_loads_with_identical_logits():
    model = haipai_lightning.HaipaiModel.from_pretrained(str(LEGACY / "export_ec"))
    with torch.no_grad():
        torch.testing.assert_close(model(REF["input_ids"]).logits, REF["export_ec"], rtol=0, atol=1e-6)


def test_old_export_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    # its modeling_haipai.py imports the old paths (haipai_lightning.quantization, .checkpoint, .export)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(LEGACY / "export_ec"), trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(REF["input_ids"]).logits, REF["export_ec"], rtol=0, atol=1e-6)


OLD_YAML_PATHS = {  # the class paths today's users have in their YAML files
    "haipai_lightning.routers.ExpertChoiceRouter": "ExpertChoiceRouter",
    "haipai_lightning.routers.TokenChoiceRouter": "TokenChoiceRouter",
    "haipai_lightning.routers.FullRecursion": "FullRecursion",
    "haipai_lightning.mixers.Attention": "Attention",
    "haipai_lightning.mixers.Mamba": "Mamba",
    "haipai_lightning.mixers.attention.Attention": "Attention",
    "haipai_lightning.mlps.SwiGLU": "SwiGLU",
    "haipai_lightning.mlps.TokenChoiceMoE": "TokenChoiceMoE",
    "haipai_lightning.mlps.ExpertChoiceMoE": "ExpertChoiceMoE",
    "haipai_lightning.mlps.AdaptiveTopPMoE": "AdaptiveTopPMoE",
    "haipai_lightning.mlps.moe.TokenChoiceMoE": "TokenChoiceMoE",
    "haipai_lightning.mlps.MixtureOfTokens": "MixtureOfTokens",
    "haipai_lightning.optim.TrapezoidLR": "TrapezoidLR",
    "haipai_lightning.optimizers.GaLoreAdamW": "GaLoreAdamW",
    "haipai_lightning.optimizers.QGaLoreAdamW": "QGaLoreAdamW",
    "haipai_lightning.optimizers.AdamW8bit": "AdamW8bit",
    "haipai_lightning.model.HaipaiModel": "HaipaiModel",
    "haipai_lightning.module.MoRLightningModule": "MoRLightningModule",
}


@pytest.mark.parametrize("old,new", sorted(OLD_YAML_PATHS.items()))
def test_old_class_paths_resolve_to_the_same_class(old, new):
    module, _, name = old.rpartition(".")
    assert getattr(importlib.import_module(module), name) is getattr(haipai_lightning, new)


def test_old_yaml_instantiates(tmp_path):
    """The legacy fixture's own YAML (old class paths everywhere) still builds its model."""
    cli = run_cli(["--config", str(LEGACY / "ec_mod.yaml"), "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    assert type(cli.model.model.router) is haipai_lightning.ExpertChoiceRouter
    assert cli.model.arch["router"]["class_path"] == "haipai_lightning.ExpertChoiceRouter"


def test_old_cli_module_names_resolve():
    """`from haipai_lightning.cli import run_cli` (the flat layout's cli.py) keeps working."""
    from haipai_lightning.cli import HaipaiCLI, generate_command, run_cli, visualize_command
    from haipai_lightning.cli.fit import run_cli as fit_run_cli

    assert run_cli is fit_run_cli and callable(generate_command) and callable(visualize_command)
    assert issubclass(HaipaiCLI, __import__("lightning").pytorch.cli.LightningCLI)
