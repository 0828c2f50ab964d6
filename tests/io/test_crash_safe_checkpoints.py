"""Checkpoints survive a SIGKILL at any moment: AtomicCheckpointIO (temp file beside the checkpoint, fsync,
rename, fsync of the directory), installed by `haipai fit`.

Lightning's own save writes its temporary file in TMPDIR and moves it: with TMPDIR on another filesystem
(/dev/shm) the move is a copy over last.ckpt, and a kill during it left last.ckpt truncated.
"""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from haipai_lightning.io.checkpoint import atomic_link, atomic_save, load_checkpoint_file
from haipai_lightning.io.checkpoint_io import AtomicCheckpointIO
from haipai_lightning.io.loader import load_model

ROOT = Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
HAIPAI = str(Path(sys.executable).with_name("haipai"))


def _tmp_files(d):
    return sorted(p.name for p in Path(d).rglob("*") if ".tmp" in p.name)


def test_atomic_save_leaves_no_temp_file_and_cleans_up_on_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    path = tmp_path / "ck" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3), "global_step": 1}, path)
    assert load_checkpoint_file(path)["global_step"] == 1
    assert _tmp_files(tmp_path) == [] and sorted(os.listdir(path.parent)) == ["last.ckpt"]

    class Boom:  # torch.save fails half-way: the old file stays whole, the temp file goes
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        atomic_save({"w": torch.zeros(3), "bad": Boom()}, path)
    assert load_checkpoint_file(path)["global_step"] == 1 and _tmp_files(tmp_path) == []

    # a temp file a killed process left behind is removed by the next save in that directory
    orphan = path.parent / f".last.ckpt.tmp-{socket.gethostname()}-999999999"
    orphan.write_bytes(b"half a checkpoint")
    atomic_save({"global_step": 2}, path)
    assert not orphan.exists() and load_checkpoint_file(path)["global_step"] == 2

    # save_last="link": the link is replaced in one rename, never removed first
    top = path.parent / "best.ckpt"
    atomic_save({"global_step": 3}, top)
    atomic_link(top, path)
    assert os.path.islink(path) and load_checkpoint_file(path)["global_step"] == 3 and _tmp_files(tmp_path) == []


def test_cli_installs_the_atomic_io(tmp_path):
    from haipai_lightning.cli.main import run_cli

    cli = run_cli(["--config", QUICK, "--trainer.logger", "false", "--data.cache_dir", str(tmp_path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("GracefulStop") == 1 and names.count("NonFiniteGuard") == 1, names
    mc = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"][0]
    assert mc.save_last is True and not mc.save_on_exception  # interrupts are GracefulStop's, at a step boundary
    # a guard of the config replaces the default one
    cli = run_cli(["--config", QUICK, "--trainer.logger", "false", "--data.cache_dir", str(tmp_path),
                   "--trainer.callbacks+=callbacks.NonFiniteGuard", "--trainer.callbacks.max_nonfinite_steps", "3"],
                  run=False)
    guards = [c for c in cli.trainer.callbacks if type(c).__name__ == "NonFiniteGuard"]
    assert len(guards) == 1 and guards[0].max_nonfinite_steps == 3


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm: a TMPDIR on another filesystem")
def test_sigkill_at_random_moments_never_breaks_last_ckpt(tmp_path):
    """A fit saving every step (~23 MB, twice: top-k and last.ckpt) is SIGKILLed 5 times, at random moments
    and in the middle of saves, each run resuming from the last.ckpt the previous one left; after each kill
    last.ckpt loads whole and TMPDIR holds nothing of ours."""
    tmpdir = tempfile.mkdtemp(dir="/dev/shm", prefix="haipai-test-")
    ck = tmp_path / "ck"
    last = ck / "last.ckpt"
    env = {**os.environ, "TMPDIR": tmpdir, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = [HAIPAI, "fit", "--config", QUICK, "--data.max_documents", "60", "--data.vocab_size", "512",
            "--data.seq_len", "32", "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"),
            "--model.config.d_model", "256", "--model.config.ffn_hidden", "512", "--model.config.max_seq_len", "64",
            "--trainer.max_steps", "100000", "--trainer.num_sanity_val_steps", "0",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(ck), "--trainer.callbacks.every_n_train_steps", "1",
            "--trainer.callbacks.save_last", "true"]
    rng = random.Random(0)
    steps, mid_save, p = [], [], None
    try:
        for kill in range(5):
            before = (last.stat().st_ino, last.stat().st_mtime_ns) if last.exists() else None
            log = open(tmp_path / f"fit{kill}.log", "w")
            p = subprocess.Popen(args + (["--ckpt_path", str(last)] if last.exists() else []), stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
            deadline = time.monotonic() + 120
            while not last.exists() or (last.stat().st_ino, last.stat().st_mtime_ns) == before:
                assert p.poll() is None, (tmp_path / f"fit{kill}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.02)
            if kill % 2 == 0:  # the first save of this run exists: kill it at a random moment later
                time.sleep(rng.uniform(0.0, 1.0))
            else:  # or in the middle of a save: as soon as a temporary file shows up beside the checkpoint
                time.sleep(rng.uniform(0.0, 0.3))
                while not _tmp_files(ck):
                    assert p.poll() is None and time.monotonic() < deadline
                    time.sleep(0.001)
            p.kill()
            p.wait()
            log.close()
            if kill % 2:  # the orphan of the cut save (unless the rename won the race); the next save removes it
                mid_save.append(len(_tmp_files(ck)) == 1)
            model, tok = load_model(str(last))  # whole: loads with weights_only=True, weights fit the architecture
            assert tok is not None and all(torch.isfinite(t).all() for t in model.state_dict().values())
            steps.append(load_checkpoint_file(last)["global_step"])
            assert _tmp_files(tmpdir) == [], "temporary files left in TMPDIR"
            # beside the checkpoints: at most the temp file of the save this kill cut short; the orphans of
            # earlier kills went with the next run's first save
            assert len(_tmp_files(ck)) <= 1, _tmp_files(ck)
        assert all(a < b for a, b in zip(steps, steps[1:])), steps  # each run resumed and saved further steps
        assert any(mid_save), "no kill landed in the middle of a save"
    finally:
        if p is not None and p.poll() is None:  # a failed assertion: do not leave the fit running
            p.kill()
            p.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
