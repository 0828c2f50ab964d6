"""Exports: safetensors + config.json + tokenizer.json; exact round trips, atomic writes, refused damage."""

import json
import os

import pytest
import torch

from haipai_lightning.io.spec import component_spec
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.io.export import WEIGHTS, load_pretrained, save_pretrained
from haipai_lightning.decode.sampling import SamplingConfig
from haipai_lightning.decode.generate import generate
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.quant.methods import quantize_model
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

V = 300
ARCH = {"router": component_spec(ExpertChoiceRouter)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                      n_recursions=3, sharing="middle_cycle", tie_embeddings=True)
    m = HaipaiModel(cfg, router=ExpertChoiceRouter).eval()
    with torch.no_grad():
        for p in m.router.parameters():
            p.mul_(40)  # decisive routing, so round trips exercise ragged depths
    return m


@pytest.fixture(scope="module")
def tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"]))
    return tok.to_str()


def _logits(m, x):
    with torch.no_grad():
        return m(x, cache=m.new_cache()).logits


@pytest.mark.parametrize("method", [None, "int8", "int8_dynamic", "int4_rotated", "w4a4kv4"])
def test_export_load_round_trip_is_exact(model, tokenizer_json, tmp_path, method):
    m = quantize_model(model, method) if method else model
    out = save_pretrained(m, tmp_path / "export", arch=ARCH, tokenizer_json=tokenizer_json)
    assert sorted(os.listdir(out)) == sorted(["config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json",
                                              "configuration_haipai.py", "modeling_haipai.py"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left
    loaded = HaipaiModel.from_pretrained(str(out))
    x = torch.randint(0, V, (2, 20))
    assert torch.equal(_logits(loaded, x), _logits(m, x))
    _, tok = load_pretrained(out)
    assert tok.to_str() == tokenizer_json
    # no pickle anywhere: the weights file is safetensors (JSON header + raw bytes)
    header_len = int.from_bytes((out / WEIGHTS).read_bytes()[:8], "little")
    json.loads((out / WEIGHTS).read_bytes()[8:8 + header_len])


def test_tied_weights_are_stored_once(model, tmp_path):
    fp = save_pretrained(model, tmp_path / "fp", arch=ARCH)
    meta = json.loads((fp / "config.json").read_text())["haipai"]
    assert meta["aliases"] == {"model.head.weight": "model.embed.weight"}
    q = save_pretrained(quantize_model(model, "int4"), tmp_path / "q4", arch=ARCH)
    assert (q / WEIGHTS).stat().st_size < 0.22 * (fp / WEIGHTS).stat().st_size  # 4 bits + fp32 scale/zero per 32


def test_truncated_or_altered_export_is_refused(model, tmp_path):
    out = save_pretrained(model, tmp_path / "e", arch=ARCH)
    w = out / WEIGHTS
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"corrupted: model.safetensors has \d+ bytes .*truncated"):
        HaipaiModel.from_pretrained(str(out))
    w.write_bytes(data[:-4] + b"\x00\x00\x00\x01")  # same size, different bytes
    with pytest.raises(ConfigError, match="sha256 of model.safetensors differs"):
        HaipaiModel.from_pretrained(str(out))
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match="not a complete Haipai export"):
        HaipaiModel.from_pretrained(str(out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HaipaiModel.from_pretrained(str(tmp_path / "nope"))


def test_export_is_atomic(model, tmp_path, monkeypatch):
    import safetensors.torch

    save_pretrained(model, tmp_path / "e", arch=ARCH)
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        save_pretrained(model, tmp_path / "e", arch=ARCH)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "f", arch=ARCH)
    with pytest.raises(OSError, match="disk full"):  # an overwrite that fails keeps the old export
        save_pretrained(model, tmp_path / "e", arch=ARCH, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["e"]
    HaipaiModel.from_pretrained(str(tmp_path / "e"))


def test_transformers_loads_the_export(model, tokenizer_json, tmp_path):
    transformers = pytest.importorskip("transformers")
    for method in (None, "int8"):
        m = quantize_model(model, method) if method else model
        out = save_pretrained(m, tmp_path / str(method), arch=ARCH, tokenizer_json=tokenizer_json)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
        x = torch.randint(0, V, (2, 12))
        with torch.no_grad():
            assert torch.equal(hf(x).logits, m(x).logits)
            ids = hf.generate(x[:1, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(ids, generate(m, x[:1, :5], SamplingConfig(max_new_tokens=6, temperature=0)))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("In the beginning")["input_ids"]
