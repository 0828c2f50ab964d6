"""Prepared data end to end: curriculum scores stored at prepare time, and `haipai fit` streaming from YAML."""

import glob
from pathlib import Path

import numpy as np
import pytest

from callbacks import CurriculumSwitch
from datamodules import TextDataModule
from datamodules.curriculum import score_documents, stage_documents
from datamodules.prepare import load_index, prepare, verify
from datamodules.prepared_curriculum import add_scores, doc_ends, read_array, read_tokens
from haipai_lightning.cli.main import main
from haipai_lightning.config import ConfigError
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file

QUICK = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pf") / "kjv")
    prepare(source="kjv", out=d, vocab_size=300, bpe_sample_mb=0.1, max_documents=60, val_fraction=0.05,
            shard_tokens=5000)
    add_scores(d, ["length", "rare_words"], window=1 << 30)  # one window: exactly TextDataModule's measure
    return d


def test_scores_are_per_document_and_stored_beside_the_shards(scored, tmp_path):
    d, index = Path(scored), load_index(scored)
    verify(scored)  # the score files are listed with their sha256
    ends = doc_ends(d, index)
    assert len(ends) == index["n_documents"]["train"] and ends[-1] == index["n_tokens"]["train"]
    tokens = read_tokens(d, index["splits"]["train"], index["dtype"], 0, int(ends[-1]))
    eos = index["eos_token_id"]
    assert np.all(tokens[ends - 1] == eos)  # each document ends with its EOS
    bounds = np.stack([np.concatenate([[0], ends[:-1]]), ends], axis=1)
    assert np.array_equal(read_array(d, index["scores"]["length"], "float64"), ends - bounds[:, 0])
    want = score_documents("rare_words", tokens, bounds, index["vocab_size"])
    assert np.allclose(read_array(d, index["scores"]["rare_words"], "float64"), want)
    # windows of whole documents: length scores do not depend on the window
    small = str(tmp_path / "w")
    prepare(source="kjv", out=small, vocab_size=300, bpe_sample_mb=0.1, max_documents=60, val_fraction=0.05,
            shard_tokens=5000)
    add_scores(small, ["length"], window=3000)
    assert np.array_equal(read_array(Path(small), load_index(small)["scores"]["length"], "float64"), ends - bounds[:, 0])
    with pytest.raises(ConfigError, match="--scores 'depth' is unknown"):
        add_scores(small, ["depth"])
    with pytest.raises(ConfigError, match="--scores rare_words"):
        TextDataModule(prepared=small, seq_len=16, batch_size=4, curriculum="rare_words").setup("fit")


def test_streamed_curriculum_trains_easy_blocks_first(scored):
    dm = TextDataModule(prepared=scored, seq_len=16, batch_size=4, seed=2, curriculum="length", curriculum_stages=2)
    dm.setup("fit")
    index = load_index(scored)
    ends = doc_ends(Path(scored), index)
    lengths = np.diff(np.concatenate([[0], ends]))
    easy = set(stage_documents(lengths.astype(float), lengths, 2)[0].tolist())
    stage0, stage1 = dm.datasets["train_stage0"], dm.datasets["train_stage1"]
    assert 0 < len(stage0) < len(stage1) <= dm.stream.n_train[0]  # cumulative: stage 1 is every train block
    per_shard = (5000 - 1) // 16  # blocks never span shards (shard_tokens=5000)
    first_token = stage0.block // per_shard * 5000 + stage0.block % per_shard * 16
    first_doc = np.searchsorted(ends, first_token, side="right")
    assert set(first_doc.tolist()) <= easy  # stage 0 blocks start in the short documents
    switch = CurriculumSwitch(steps=[3])
    dm.curriculum_schedule = switch.stage_at  # what the callback attaches in setup()
    loader = dm.train_dataloader()
    first = next(iter(loader))["input_ids"]
    rows = {tuple(stage0[i]["input_ids"].tolist()) for i in range(len(stage0))}
    assert all(tuple(r.tolist()) in rows for r in first)


def test_haipai_fit_streams_prepared_data_from_yaml(scored, tmp_path, capsys):
    """`haipai fit --config quickstart.yaml --data.prepared DIR`: the default data class streams, the model's
    vocabulary follows the prepared tokenizer, curriculum + multi-scale work through the CLI."""
    root = tmp_path / "run"
    switch = '{"class_path": "callbacks.CurriculumSwitch", "init_args": {"steps": [2]}}'
    main(["fit", "--config", QUICK, "--data.prepared", scored, "--data.vocab_size", "null", "--data.seq_len", "16",
          "--data.batch_size", "4", "--data.curriculum", "length", "--data.curriculum_stages", "2",
          "--data.multiscale_lens", "[8, 16]", f"--trainer.callbacks=[{switch}]", "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir",
          str(root), "--model.config.d_model", "32", "--model.config.ffn_hidden", "64", "--model.config.max_seq_len", "16"])
    last = glob.glob(str(root / "lightning_logs" / "*" / "checkpoints" / "last.ckpt"))
    assert last
    ckpt = load_checkpoint_file(last[0])
    assert ckpt["hyper_parameters"]["config"]["vocab_size"] == load_index(scored)["vocab_size"] == 300
    assert ckpt["TextDataModule"]["batches_done"] == 4 and ckpt["TextDataModule"]["seq_len"] == 16
    assert ckpt[CHECKPOINT_KEY]["tokenizer"] == (Path(scored) / "tokenizer.json").read_text()  # for generate
    config = (Path(last[0]).parents[1] / "config.yaml").read_text()
    assert f"prepared: {scored}" in config
    with pytest.raises(SystemExit) as e:  # a typo in the directory: one line naming the field, exit 2
        main(["fit", "--config", QUICK, "--data.prepared", str(tmp_path / "nope"), "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "data.prepared" in err and "haipai prepare" in err


def test_bad_prepared_settings_are_one_line(scored):
    cases = [(dict(weights=[1.0]), "data.weights weighs data.prepared"),
             (dict(prepared=scored, curriculum="reference_loss", curriculum_reference="x.ckpt"), "--score_reference"),
             (dict(prepared=[scored, scored], weights=[1, 1], curriculum="length"), "data.weights"),
             (dict(prepared=scored + "-typo"), "set data.prepared null to read data.source"),
             (dict(prepared=scored, seq_len=16, multiscale_lens=[16], multiscale_steps=[5]), "data.multiscale_steps")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            TextDataModule(**kw)
        assert "\n" not in str(e.value)
