"""`haipai reformulate` and `--lookup` from the command line: a run, and one-line errors (exit 2)."""

import json
from pathlib import Path

import pytest
import torch

from datamodules.reformulate import check_fanout, read_reformulations
from haipai_lightning.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CKPT = str(ROOT / "tests" / "fixtures" / "legacy" / "ec_mod.ckpt")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only synchronises
    yield
    torch.set_num_threads(before)


def test_reformulate_command_writes_k_variants(tmp_path, one_thread):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document number {i}."}) + "\n" for i in range(3)))
    out = tmp_path / "mga.jsonl"
    main(["reformulate", "--source", str(src), "--out", str(out), "--model", CKPT, "--k", "2",
          "--max_new_tokens", "3", "--pair_tokens", "4", "--max_document_chars", "40", "--temperature", "0"])
    check_fanout(read_reformulations(out), 2)
    assert len(read_reformulations(out)) == 6


@pytest.mark.parametrize("args, match", [
    (["--backend", "llama"], "--backend 'llama' is unknown"),
    (["--backend", "openai"], "needs --base_url"),
    (["--k", "0"], "--k 0"),
    (["--pairs_prompt", "nope.txt"], "--pairs_prompt 'nope.txt' does not exist"),
])
def test_reformulate_bad_flags_are_one_line(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(["reformulate", "--source", "kjv", "--out", str(tmp_path / "o.jsonl"), "--model", CKPT, *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_lookup_needs_an_existing_store(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt_path", CKPT, "--prompt", "x", "--lookup", str(tmp_path / "none.db")])
    assert e.value.code == 2 and "fact store" in capsys.readouterr().err
