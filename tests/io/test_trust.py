"""Loading a checkpoint or an export never runs code the file names; --overwrite never deletes a
directory Haipai did not write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import haipai_lightning
from haipai_lightning.config import ConfigError
from haipai_lightning.io.loader import load_model
from haipai_lightning.io.spec import build_component, register_component, resolve_class
from haipai_lightning.train.module import MoRLightningModule

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LEGACY = HERE.parent / "fixtures" / "legacy"
HAIPAI = [sys.executable, "-m", "haipai_lightning.cli.main"]
EVIL = "evil_components.Evil"  # importable from tests/io (pytest puts it on sys.path)


def _env():
    return {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def crafted_checkpoint(tmp_path: Path, marker: Path, where: str) -> Path:
    ckpt = torch.load(LEGACY / "ec_mod.ckpt", weights_only=True)
    spec = {"class_path": EVIL, "init_args": {"marker": str(marker)}}
    if where == "arch":
        ckpt["haipai"]["arch"]["router"] = spec
    elif where == "stdlib":
        ckpt["haipai"]["arch"]["mlp"] = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
    elif where == "hparams_router":
        ckpt["hyper_parameters"]["router"] = spec
        ckpt["hyper_parameters"]["_instantiator"] = "os.system"  # Lightning would import and call this
    elif where == "hparams":
        ckpt["hyper_parameters"]["_instantiator"] = "os.system"
        ckpt["hyper_parameters"]["optimizer"] = spec
        ckpt["hyper_parameters"]["lr_scheduler"] = spec
    path = tmp_path / f"crafted_{where}.ckpt"
    torch.save(ckpt, path)
    return path


def test_the_crafted_spec_would_run_if_imported(tmp_path):
    """Control: the spec the crafted files carry really runs code when a loader imports and calls it."""
    import importlib

    marker = tmp_path / "control"
    mod, _, name = EVIL.rpartition(".")
    getattr(importlib.import_module(mod), name)(None, marker=str(marker))
    assert marker.exists()


@pytest.mark.parametrize("where", ["arch", "stdlib"])
def test_checkpoint_naming_a_callable_is_refused(tmp_path, where):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path, marker, where)
    with pytest.raises(ConfigError, match="not a Haipai component"):
        load_model(str(path))
    with pytest.raises(ConfigError, match="not a Haipai component"):
        MoRLightningModule.load_from_checkpoint(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("cmd", [["generate", "--prompt", "In"], ["eval", "--perplexity", "false", "--efficiency", "false"],
                                 ["visualize"], ["quantize", "--method", "int8"]])
def test_every_command_refuses_a_crafted_checkpoint(tmp_path, cmd):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path, marker, "arch")
    extra = ["--out", str(tmp_path / "pics")] if cmd[0] == "visualize" else []
    r = subprocess.run(HAIPAI + [cmd[0], "--ckpt_path", str(path), *cmd[1:], *extra], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert EVIL in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_saved_hyperparameters_are_never_executed(tmp_path):
    """LightningCLI would merge a checkpoint's hyper_parameters (optimizer, scheduler, router specs) into the
    config and instantiate them: Haipai compares, never executes."""
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path, marker, "hparams")
    base = ["--config", str(LEGACY / "ec_mod.yaml"), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache")]
    r = subprocess.run(HAIPAI + ["fit", *base, "--ckpt_path", str(path)], env=_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "optimizer" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not marker.exists()
    # the Python API builds nothing from the saved specs either: no _instantiator, optimizer specs stay data
    module = MoRLightningModule.load_from_checkpoint(path)
    assert type(module.model.router) is haipai_lightning.ExpertChoiceRouter
    with pytest.raises(ConfigError, match="not import what a file names"):
        module.configure_optimizers()
    with pytest.raises(ConfigError, match="not a Haipai component"):
        MoRLightningModule.load_from_checkpoint(crafted_checkpoint(tmp_path, marker, "hparams_router"))
    assert not marker.exists()


def crafted_export(tmp_path: Path, marker: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(LEGACY / "export_ec", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["haipai"]["arch"]["router"] = {"class_path": EVIL, "init_args": {"marker": str(marker)}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_export_naming_a_callable_is_refused(tmp_path):
    marker = tmp_path / "ran"
    out = crafted_export(tmp_path, marker)
    with pytest.raises(ConfigError, match="not a Haipai component"):
        haipai_lightning.HaipaiModel.from_pretrained(str(out))
    assert not marker.exists()


def test_registered_components_load_and_unregistered_are_named(tmp_path):
    with pytest.raises(ConfigError, match="register_component"):
        resolve_class("tests.not.Registered")
    with pytest.raises(ConfigError, match="plain values"):
        build_component({"class_path": "haipai_lightning.SwiGLU", "init_args": {"hidden": object()}})

    class MyRouter(haipai_lightning.FullRecursion):
        pass

    register_component(MyRouter, "my_pkg.MyRouter")
    assert resolve_class("my_pkg.MyRouter") is MyRouter


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_overwrite_refuses_a_foreign_directory(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("years of work")
    (thesis / "chapters" / "one.tex").write_text("more")
    before = _tree(thesis)
    for cmd in (["export", "--overwrite", "true"], ["quantize", "--method", "int8", "--overwrite", "true"],
                ["quantize", "--method", "int8"]):
        r = subprocess.run(HAIPAI + [cmd[0], "--ckpt_path", str(LEGACY / "ec_mod.ckpt"), "--out", str(thesis), *cmd[1:]],
                           env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert _tree(thesis) == before


def test_overwrite_replaces_a_haipai_export_but_not_one_holding_your_files(tmp_path):
    model, tok = load_model(str(LEGACY / "ec_mod.ckpt"))
    out = tmp_path / "exp"
    haipai_lightning.save_pretrained(model, out)
    haipai_lightning.save_pretrained(model, out, overwrite=True)  # a Haipai export: replaced
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(ConfigError, match="NOTES.md"):
        haipai_lightning.save_pretrained(model, out, overwrite=True)
    assert (out / "NOTES.md").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp.")]  # no temporary directories left


class MyRouter(haipai_lightning.FullRecursion):
    """A user's own router, handed over as a class (as a YAML class_path would)."""


def test_a_users_own_component_trains_and_reloads_in_its_process():
    module = MoRLightningModule(config=haipai_lightning.ModelConfig(vocab_size=64, d_model=32, n_layers=3,
                                                                    n_recursions=1), router=MyRouter)
    assert type(module.model.router) is MyRouter
    assert module.arch["router"]["class_path"] == f"{__name__}.MyRouter"
    assert resolve_class(f"{__name__}.MyRouter") is MyRouter  # registered by being handed over
    with pytest.raises(ConfigError, match="register_component"):
        resolve_class("somebody_else.Router")  # a path only a file names stays refused
