"""Ctrl-C / SIGTERM during `haipai fit`, then --ckpt_path: exactly the uninterrupted run (callbacks.GracefulStop).

Before, a Ctrl-C saved wherever the KeyboardInterrupt landed (mid-step): the resumed run validated one step
early and its final step was never saved; SIGTERM exited 0 and its checkpoint was named best-... The runs
here: 30 steps of the tiny model, 12 batches per epoch, validation every 4 steps (at 4, 8, ..., 28).
"""

import glob
import os
import signal
import time

import pytest

from fit_probe import fit, read_events
from haipai_lightning.io.checkpoint import load_checkpoint_file

STEPS = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    r = fit(root, root / "events.jsonl", root / "cache", *STEPS)
    assert r.returncode == 0, r.stderr[-3000:]
    train, val, _ = read_events(root / "events.jsonl")
    assert sorted(train) == list(range(1, 31)) and [s for s, _ in val] == [4, 8, 12, 16, 20, 24, 28]
    assert load_checkpoint_file(_ckpt(root, 0, "last.ckpt"))["global_step"] == 30  # the final step is saved
    return root, train, val


def _ckpt(root, version, name):
    return os.path.join(root, "lightning_logs", f"version_{version}", "checkpoints", name)


def _check_resume(root, reference, stopped_at, r_stderr):
    ref_root, ref_train, ref_val = reference
    assert f"stopped after step {stopped_at}, saved {_ckpt(root, 0, 'last.ckpt')}" in r_stderr
    assert "Traceback" not in r_stderr
    last = _ckpt(root, 0, "last.ckpt")
    assert load_checkpoint_file(last)["global_step"] == stopped_at  # the state after the last finished step
    # no checkpoint is named best-... unless a validation chose it
    ref_val_steps = {s for s, _ in ref_val}
    for f in glob.glob(_ckpt(root, 0, "best-*.ckpt")):
        assert load_checkpoint_file(f)["global_step"] in ref_val_steps, f

    r = fit(root, root / "resumed.jsonl", ref_root / "cache", *STEPS, "--ckpt_path", last)
    assert r.returncode == 0, r.stderr[-3000:]
    train, val, _ = read_events(root / "events.jsonl", root / "resumed.jsonl")
    first, _, _ = read_events(root / "events.jsonl")
    assert max(first) == stopped_at
    assert sorted(train) == sorted(ref_train)
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, abs=1e-6), step
    assert [s for s, _ in val] == [s for s, _ in ref_val]  # validation at the same global steps ...
    for (_, got), (_, want) in zip(val, ref_val):
        assert got == pytest.approx(want, abs=1e-6)  # ... with the same values
    assert load_checkpoint_file(_ckpt(root, 1, "last.ckpt"))["global_step"] == 30  # the final step is saved


@pytest.mark.parametrize("how,signal_at,phase,stopped_at", [
    # Ctrl-C between the backward and the optimizer step of step 10: step 10 finishes, then the stop
    ("SIGINT", 9, "step", 10),
    # SIGTERM in the validation after step 12, the last batch of epoch 0: the validation finishes and the
    # stop comes after step 13, inside epoch 1 (Lightning resumes a stop at an epoch end one epoch late)
    ("SIGTERM", 9, "val", 13),
])
def test_interrupt_then_resume_is_the_uninterrupted_run(tmp_path, reference, how, signal_at, phase, stopped_at):
    r = fit(tmp_path, tmp_path / "events.jsonl", reference[0] / "cache", *STEPS, signal_at=signal_at,
            signal_name=how, phase=phase)
    assert r.returncode == 128 + getattr(signal, how), (r.returncode, r.stderr[-3000:])  # 130 / 143
    assert f"haipai: {how}: stopped after step" in r.stderr
    _check_resume(tmp_path, reference, stopped_at, r.stderr)


def test_ctrl_c_from_outside_at_a_random_moment(tmp_path, reference):
    """A real Ctrl-C: SIGINT from another process at an arbitrary point of step 6..7 (slowed to 0.3 s a step)."""
    p = fit(tmp_path, tmp_path / "events.jsonl", reference[0] / "cache", *STEPS, "--trainer.callbacks.sleep", "0.3",
            popen=True)
    try:
        deadline = time.monotonic() + 120
        while len(read_events(tmp_path / "events.jsonl")[0]) < 6:
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "fit.log").read_text()[-3000:]
            time.sleep(0.01)
        time.sleep(0.17)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=120) == 130, (tmp_path / "fit.log").read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    log = (tmp_path / "fit.log").read_text()
    stopped_at = max(read_events(tmp_path / "events.jsonl")[0])
    assert stopped_at < 30
    _check_resume(tmp_path, reference, stopped_at, log)
