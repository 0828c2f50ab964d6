"""Every mistake gets one line: a table of bad invocations, each run as a real `haipai` subprocess.

Each must exit with code 2, print one error line on stderr naming the field (or the file and
line), print no traceback, and leave what was in the run's directory untouched. Mistakes found
before training starts print nothing else; those found once `fit` runs (the optimizer, the data)
follow Lightning's own start-up lines.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEGACY = ROOT / "tests" / "fixtures" / "legacy"
CKPT = "model.ckpt"  # a copy of the legacy checkpoint in each case's directory (max_seq_len 64, Nr=2)


def fit(*extra: str) -> list[str]:
    return ["fit", "--config", str(LEGACY / "ec_mod.yaml"), "--trainer.callbacks", "[]", "--trainer.logger", "false",
            "--trainer.default_root_dir", ".", "--data.cache_dir", "cache", "--data.source", "small.txt",
            "--trainer.max_steps", "2", *extra]


# (id, argv, what stderr must name)
CASES = [
    ("top_p_0", ["generate", "--ckpt_path", CKPT, "--top_p", "0"], "--top_p"),
    ("top_p_above_1", ["generate", "--ckpt_path", CKPT, "--top_p", "1.5"], "--top_p"),
    ("temperature_negative", ["generate", "--ckpt_path", CKPT, "--temperature", "-1"], "--temperature"),
    ("top_k_negative", ["generate", "--ckpt_path", CKPT, "--top_k", "-3"], "--top_k"),
    ("max_new_tokens_negative", ["generate", "--ckpt_path", CKPT, "--max_new_tokens", "-5"], "--max_new_tokens"),
    ("batch_size_0", ["generate", "--ckpt_path", CKPT, "--prompts", "prompts.txt", "--batch_size", "0"], "--batch_size"),
    ("token_budget_untrained", ["generate", "--ckpt_path", CKPT, "--token_budget", "8"], "--token_budget"),
    ("depth_budget_0", ["generate", "--ckpt_path", CKPT, "--prompts", "prompts.txt", "--depth_budget", "0"],
     "--depth_budget"),
    ("speculative_negative", ["generate", "--ckpt_path", CKPT, "--speculative", "-1"], "--speculative"),
    ("draft_depth_beyond_nr", ["generate", "--ckpt_path", CKPT, "--speculative", "2", "--temperature", "0",
                               "--draft_depth", "5"], "--draft_depth"),
    ("prompt_longer_than_context", ["generate", "--ckpt_path", CKPT, "--prompts", "prompts_long.txt", "--max_new_tokens",
                                    "20"], "line 3"),
    ("prompts_not_utf8", ["generate", "--ckpt_path", CKPT, "--prompts", "latin1.txt"], "line 1"),
    ("prompts_missing", ["generate", "--ckpt_path", CKPT, "--prompts", "nope.txt"], "--prompts"),
    ("ckpt_missing", ["generate", "--ckpt_path", "nope.ckpt"], "nope.ckpt"),
    ("ckpt_truncated", ["generate", "--ckpt_path", "truncated.ckpt"], "truncated.ckpt"),
    ("ckpt_random", ["generate", "--ckpt_path", "random.ckpt"], "random.ckpt"),
    ("ckpt_pickle", ["generate", "--ckpt_path", "pickle.ckpt"], "pickle.ckpt"),
    ("fit_ckpt_truncated", fit("--ckpt_path", "truncated.ckpt"), "truncated.ckpt"),
    ("fit_ckpt_pickle", fit("--ckpt_path", "pickle.ckpt"), "pickle.ckpt"),
    ("validate_ckpt_random", ["validate", *fit("--ckpt_path", "random.ckpt")[1:]], "random.ckpt"),
    ("ffn_hidden_negative", fit("--model.config.ffn_hidden", "-4"), "ffn_hidden"),
    ("ffn_hidden_0", fit("--model.config.ffn_hidden", "0"), "ffn_hidden"),
    ("rope_theta_0", fit("--model.config.rope_theta", "0"), "rope_theta"),
    ("init_std_negative", fit("--model.config.init_std", "-0.02"), "init_std"),
    ("lr_negative", fit("--model.optimizer.init_args.lr", "-1"), "lr"),
    ("max_steps_negative", fit("--trainer.max_steps", "-5"), "max_steps"),
    ("data_latin1", fit("--data.source", "latin1.txt"), "latin1.txt"),
    ("data_binary", fit("--data.source", "binary.txt"), "binary.txt"),
    ("jsonl_text_not_a_string", fit("--data.source", "bad.jsonl"), "bad.jsonl:2"),
    ("eval_unknown_task", ["eval", "--ckpt_path", CKPT, "--tasks", "hellaswagg"], "--tasks"),
    ("export_out_dot", ["export", "--ckpt_path", CKPT, "--out", "."], "--out"),
    ("export_out_dot_overwrite", ["export", "--ckpt_path", CKPT, "--out", ".", "--overwrite", "true"], "--out"),
    ("export_overwrite_foreign", ["export", "--ckpt_path", CKPT, "--out", "thesis", "--overwrite", "true"], "--out"),
    ("quantize_out_exists", ["quantize", "--ckpt_path", CKPT, "--method", "int8", "--out", "thesis"], "--out"),
]


LATE = {"lr_negative", "data_latin1", "data_binary", "jsonl_text_not_a_string"}  # found once fit has started


def _prepare(d: Path) -> None:
    shutil.copy(LEGACY / "ec_mod.ckpt", d / CKPT)
    (d / "prompts.txt").write_text("In the beginning\nAnd God said\n")
    (d / "prompts_long.txt").write_text("In the\n\n" + "And the earth " * 40 + "\nLet there be\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    (d / "small.txt").write_text("In the beginning God created the heaven and the earth.\n\n" * 50)
    (d / "truncated.ckpt").write_bytes((LEGACY / "ec_mod.ckpt").read_bytes()[:5000])
    (d / "random.ckpt").write_bytes(os.urandom(4096))
    (d / "pickle.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "x": os.getcwd}))
    (d / "thesis" / "chapters").mkdir(parents=True)
    (d / "thesis" / "thesis.tex").write_text("years of work")
    (d / "thesis" / "chapters" / "one.tex").write_text("more")


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def _run(case, base: Path):
    name, argv, _ = case
    d = base / name
    d.mkdir()
    _prepare(d)
    before = _snapshot(d)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HAIPAI_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "haipai_lightning.cli.main", *argv], cwd=d, env=env,
                       capture_output=True, text=True, timeout=300)
    after = _snapshot(d)
    return r, before, after


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c[0] for c in CASES], pool.map(lambda c: _run(c, base), CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation_gets_one_line(case, results):
    name, argv, names = case
    r, before, after = results[name]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in err if line.startswith("haipai: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], r.stderr[-3000:]
    if name not in LATE:
        assert len(err) == 1, r.stderr[-3000:]
    assert names in errors[0], errors[0]
    changed = {k for k in before if before.get(k) != after.get(k)}
    assert not changed, f"changed or deleted: {sorted(changed)}"
