"""The `haipai` command: end-to-end fit -> checkpoint -> generate, and one-line errors for bad input."""

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from haipai_lightning.cli.main import main

ROOT = Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
# small data so each run prepares in about a second
SMALL = ["--data.max_documents", "60", "--data.vocab_size", "512", "--data.seq_len", "32", "--data.batch_size", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def haipai_error(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


def test_fit_writes_tensorboard_and_last_ckpt_then_generate(tmp_path):
    """The issue's acceptance command, through the installed console script."""
    root = tmp_path / "run"
    exe = str(Path(sys.executable).with_name("haipai"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([exe, "fit", "--config", QUICK, "--trainer.max_steps", "20", "--trainer.default_root_dir",
                        str(root), "--data.cache_dir", str(tmp_path / "cache"), "--trainer.limit_val_batches", "2",
                        "--trainer.val_check_interval", "10"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert glob.glob(str(root / "lightning_logs" / "*" / "events.out.tfevents.*"))
    last = glob.glob(str(root / "lightning_logs" / "*" / "checkpoints" / "last.ckpt"))
    assert last
    assert "unique parameters" in r.stdout + r.stderr
    assert "vs unigram entropy" in r.stdout and "sample: And God said" in r.stdout
    g = subprocess.run([exe, "generate", "--ckpt_path", last[0], "--prompt", "The", "--max_new_tokens", "12"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    assert g.stdout.startswith("The") and len(g.stdout.split()) > 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\nAnd God said\nThe LORD\n")
    g = subprocess.run([exe, "generate", "--ckpt_path", last[0], "--prompts", str(prompts), "--batch_size", "2",
                        "--max_new_tokens", "8", "--depth_budget", "2.0"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    outs = [t.strip() for t in g.stdout.split("---") if t.strip()]
    assert [o.split()[0] for o in outs] == ["In", "And", "The"]
    assert g.stderr.count("mean recursion depth") == 3


def test_tensorboard_scalars_logged(tmp_path, cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "--config", QUICK, *SMALL, "--data.cache_dir", cache, "--trainer.max_steps", "12",
          "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "2",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"])
    ev = EventAccumulator(glob.glob(str(tmp_path / "lightning_logs" / "*"))[0])
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "train/tokens_per_s", "val/loss", "val/ppl", "lr-AdamW/decay"} <= tags, tags
    # the quickstart routes (expert-choice): every aux term and the threshold agreement are logged
    assert {"train/aux/depth/step1/bce", "train/total_loss", "val/sampling_acc/depth/step1"} <= tags, tags


def test_predict_returns_nll(tmp_path, cache):
    from haipai_lightning.cli.main import run_cli

    cli = run_cli(["--config", QUICK, *SMALL, "--data.cache_dir", cache, "--trainer.logger", "false"], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("predict")
    out = cli.trainer.predict(cli.model, dataloaders=cli.datamodule.predict_dataloader())
    assert out[0]["nll"].shape == (4,) and (out[0]["nll"] > 0).all()
    assert out[0]["nll"].mean() == pytest.approx(math.log(512), abs=0.5)  # untrained: about uniform


def test_bad_heads(capsys):
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--model.config.n_heads", "5")
    assert "model.config.n_heads=5 does not divide model.config.d_model=192" in msg


def test_bad_recursions(capsys):
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--model.config.n_recursions", "2")
    assert "n_layers=5 cannot hold n_recursions=2" in msg and "use n_layers in" in msg


def test_unknown_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config:\n    d_modle: 3\n")
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--config", str(bad))
    assert "d_modle" in msg and "--help" in msg
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--trainer.max_stepz", "3")
    assert "max_stepz" in msg


def test_missing_and_empty_data(capsys, tmp_path):
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--data.source", str(tmp_path / "nope.txt"),
                       "--trainer.default_root_dir", str(tmp_path))
    assert "data.source" in msg and "does not exist" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    msg = haipai_error(capsys, "fit", "--config", QUICK, "--data.source", str(empty),
                       "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "c"))
    assert "data.source" in msg and "no text" in msg


def test_checkpoint_of_another_architecture(capsys, tmp_path, cache):
    args = ["fit", "--config", QUICK, *SMALL, "--data.cache_dir", cache, "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]"]
    main([*args, "--trainer.max_steps", "2"])
    last = glob.glob(str(tmp_path / "lightning_logs" / "*" / "checkpoints" / "last.ckpt"))[0]
    msg = haipai_error(capsys, *args, "--trainer.max_steps", "4", "--model.config.d_model", "128",
                       "--ckpt_path", last)
    assert "another architecture" in msg and "model.config.d_model: checkpoint 192 vs now 128" in msg
    msg = haipai_error(capsys, "generate", "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert "--ckpt_path" in msg and "does not exist" in msg


def test_help_documents_fields():
    r = subprocess.run([str(Path(sys.executable).with_name("haipai")), "fit", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for doc in ("Effective depth: layers a token passes through", "Recursion count Nr in 1..4",
                "depth router factory", "Tokens per training example"):
        assert doc in " ".join(r.stdout.split()), doc
