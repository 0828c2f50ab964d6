"""Calibrated quantization: GPTQ, GuidedQuant, LNQ, SpinQuant, quantized MoE experts (issue #22)."""

import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from haipai_lightning.config import ModelConfig
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mlps.moe import ExpertChoiceMoE, TokenChoiceMoE
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.quant.calibration import block_linears, collect_stats
from haipai_lightning.quant.gptq import gptq_quantize, layer_error, quantize_rtn
from haipai_lightning.quant.guided import guided_hessians, guided_objective, guided_quantize
from haipai_lightning.quant.lnq import lnq_quantize, lnq_solve
from haipai_lightning.quant.methods import METHODS, QuantSpec, quantize_model
from haipai_lightning.quant.qexperts import QExperts
from haipai_lightning.quant.qtensor import QuantizedWeight
from haipai_lightning.quant.rotation import fuse_norm_gains
from haipai_lightning.quant.spinquant import apply_rotation, learn_rotation
from helpers import train_on_kjv

V = 97


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_gptq_with_unit_hessian_is_round_to_nearest_bit_for_bit(bits):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    q = gptq_quantize(w, torch.eye(64), bits, group_size=16)
    r = quantize_rtn(w, bits, 16)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)
    if bits in (4, 8):  # and the same codes / scales as the stored round-to-nearest (qtensor.py)
        ref = QuantizedWeight.from_float(w, bits, 16)
        assert torch.equal(q.to_qweight().qweight, ref.qweight) and torch.equal(q.to_qweight().scale, ref.scale)
        torch.testing.assert_close(q.dequantize(), ref.dequantize(), rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained():
    """A small MoR model (d=64) trained briefly on King James Bible text; training / validation batches."""
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=64, n_recursions=3, sharing="middle_cycle")
    m, it, dm = train_on_kjv(lambda: HaipaiModel(cfg, router=ExpertChoiceRouter), steps=80)
    calib = [next(it) for _ in range(2)]
    val = [b for _, b in zip(range(2), dm.val_dataloader())]
    return m.eval(), calib, val


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_layer_error_is_at_most_rtn_on_real_calibration_data(trained, bits):
    m, calib, _ = trained
    for li in (0, 1):  # the prelude layer and the shared MoR block (inputs of all three recursion steps)
        lins = block_linears(m.layers[li], f"l{li}")
        stats = collect_stats(m, calib, lins)
        assert set(stats) == set(lins)
        for key, (parent, name) in lins.items():
            w, h = getattr(parent, name).weight.detach(), stats[key]
            e_gptq = layer_error(w, gptq_quantize(w, h, bits, 32).dequantize(), h)
            e_rtn = layer_error(w, quantize_rtn(w, bits, 32).dequantize(), h)
            assert e_gptq <= e_rtn, (key, e_gptq, e_rtn)


def test_guided_with_unit_gradients_is_gptq():
    torch.manual_seed(1)
    x, w = torch.randn(200, 32), torch.randn(12, 32)
    hs = guided_hessians(x, torch.ones(200, 12), groups=3)
    h = 2 * x.double().T @ x.double()
    for g in range(3):
        torch.testing.assert_close(hs[g], h)
    qg, qp = guided_quantize(w, hs, 3, 16), gptq_quantize(w, h, 3, 16)
    assert torch.equal(qg.codes, qp.codes)
    assert guided_objective(w, qg.dequantize(), hs) == pytest.approx(layer_error(w, qp.dequantize(), h), rel=1e-12)
    # real gradients re-weight the tokens, group by group
    hs2 = guided_hessians(x, torch.randn(200, 12), groups=3)
    assert not torch.allclose(hs2[0], hs2[1])


def test_lnq_objective_never_increases():
    torch.manual_seed(2)
    x, w = torch.randn(300, 48), torch.randn(10, 48)
    x[:, :8] *= 5  # a few salient inputs
    h = 2 * x.double().T @ x.double()
    hist: list[float] = []
    w_hat, codes, book = lnq_quantize(w, h, bits=3, iters=4, history=hist)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] < hist[0]
    assert int(codes.max()) < 8 and book.shape == (10, 8)
    assert layer_error(w, w_hat, h) < layer_error(w, quantize_rtn(w, 3, 48).dequantize(), h)


def test_lnq_is_stored_as_codes_and_codebooks_and_reproduces_the_solution():
    """The stored LNQ weight (int4 nibbles + a per-row codebook) dequantizes to exactly the solver's
    w_hat; a QLinear on it computes x w_hat^T; guided groups get their own codebooks."""
    from haipai_lightning.quant.layers import QLinear

    torch.manual_seed(5)
    x, w = torch.randn(200, 32), torch.randn(12, 32)
    h = 2 * x.double().T @ x.double()
    w_hat, _, _ = lnq_quantize(w, h, bits=3, iters=3)
    q = lnq_solve(w, h, bits=3, iters=3)
    torch.testing.assert_close(q.dequantize(), w_hat.float())
    qw = q.to_qweight()
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (12, 16) and qw.codebook.shape == (12, 8)
    torch.testing.assert_close(qw.dequantize(), w_hat.float())
    torch.testing.assert_close(QLinear(qw)(x[:5]), x[:5] @ w_hat.float().T, atol=1e-5, rtol=1e-5)
    hs = guided_hessians(x, torch.randn(200, 12), groups=3)
    qg = lnq_solve(w, hs, bits=2, iters=2)
    assert int(qg.codes.max()) < 4 and qg.codebook.shape == (12, 4)
    assert guided_objective(w, qg.dequantize(), hs) < guided_objective(w, quantize_rtn(w, 2, 32).dequantize(), hs)


def test_lnq_method_quantizes_a_model_exports_and_loads_back(tmp_path):
    from haipai_lightning.io.export import load_pretrained, save_pretrained

    torch.manual_seed(6)
    m = HaipaiModel(ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=64)).eval()
    calib = [{"input_ids": torch.randint(0, V, (4, 32)), "labels": torch.randint(0, V, (4, 32))}]
    q = quantize_model(m, "int3_lnq", calib=calib)
    lin = q.layers[0].mlp.w1
    assert lin.qw.codebook_size == 8 and int(lin.qw.codes().max()) < 8
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert rel(q(x).logits, m(x).logits) < 0.2
        back, _ = load_pretrained(save_pretrained(q, tmp_path / "m", arch=None))
        torch.testing.assert_close(back(x).logits, q(x).logits, atol=1e-5, rtol=1e-5)


def test_spinquant_rotation_is_orthogonal_and_leaves_fp32_unchanged(trained):
    m, calib, _ = trained
    r = copy.deepcopy(m)
    fuse_norm_gains(r)
    losses: list[float] = []
    Q, R = learn_rotation(r, calib, 4, 4, 4, 32, steps=4, log=losses)
    eye = torch.eye(Q.size(0), dtype=torch.float64)
    assert float((Q @ Q.T - eye).abs().max()) < 1e-5
    assert float((R @ R.T - torch.eye(R.size(0), dtype=torch.float64)).abs().max()) < 1e-5
    assert len(losses) == 5
    x = calib[0]["input_ids"][:2]
    with torch.no_grad():
        ref = m(x).logits
        apply_rotation(r, Q, R)
        assert rel(r(x).logits, ref) < 1e-5


def test_calibrated_methods_are_registered_and_beat_rtn_end_to_end(trained):
    from haipai_lightning.eval.quant_report import perplexity

    m, calib, val = trained
    for name in ("int4_gptq", "int3_gptq", "int4_guided", "int3_guided", "int3_rtn", "w4a4kv4_spinquant"):
        assert name in METHODS
    assert QuantSpec.from_dict(METHODS["int3_gptq"].to_dict()) == METHODS["int3_gptq"]
    fp = perplexity(m, val)
    rtn = perplexity(quantize_model(m, "int3_rtn"), val)
    gptq = perplexity(quantize_model(m, "int3_gptq", calib=calib), val)
    assert fp < rtn and gptq < rtn, (fp, rtn, gptq)


@pytest.mark.parametrize("mlp", ["token_choice", "expert_choice"])
def test_quantized_moe_experts_decode_like_the_full_forward(mlp):
    torch.manual_seed(3)
    make = {"token_choice": lambda cfg: TokenChoiceMoE(cfg, n_experts=4, top_k=2, expert_hidden=64),
            "expert_choice": lambda cfg: ExpertChoiceMoE(cfg, n_experts=4, capacity_factor=2.0, expert_hidden=64)}
    m = HaipaiModel(ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=64),
                    mlp=make[mlp]).eval()
    calib = [{"input_ids": torch.randint(0, V, (4, 32)), "labels": torch.randint(0, V, (4, 32))}]
    q = quantize_model(m, "int4_gptq", calib=calib)
    assert isinstance(q.layers[0].mlp.experts, QExperts)
    assert q.layers[0].mlp.experts.w1[0].qw.qweight.dtype == torch.uint8  # really stored int4
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = q(x).logits
        cache = q.new_cache(12)
        steps = [q(x[:, t:t + 1], cache=cache).logits for t in range(12)]
        assert rel(full, m(x).logits) < 0.2
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["int3_gptq", "int4_guided"])
def test_calibrated_exports_load_back(tmp_path, method):
    from haipai_lightning.io.export import load_pretrained, save_pretrained

    torch.manual_seed(4)
    mlp = functools.partial(TokenChoiceMoE, n_experts=2, top_k=1, expert_hidden=64)
    m = HaipaiModel(ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=64),
                    mlp=mlp if method == "int3_gptq" else None).eval()
    calib = [{"input_ids": torch.randint(0, V, (4, 32)), "labels": torch.randint(0, V, (4, 32))}]
    q = quantize_model(m, method, calib=calib)
    path = save_pretrained(q, tmp_path / "m", arch=None)
    back, _ = load_pretrained(path)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, q(x).logits, atol=1e-5, rtol=1e-5)


def test_callback_calibrates_on_training_batches(tmp_path, monkeypatch):
    """PostTrainingQuantization hands a calibrated method training batches (not the validation ones), and
    accepts weight methods on an MoE model (rotations it refuses)."""
    from types import SimpleNamespace

    import lightning as L

    from callbacks import PostTrainingQuantization
    from datamodules import TextDataModule
    from haipai_lightning.config import ConfigError
    from haipai_lightning.eval import quant_report
    from haipai_lightning.train.module import MoRLightningModule

    moe = HaipaiModel(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64), mlp=TokenChoiceMoE)
    PostTrainingQuantization(methods=["int4_gptq"]).setup(None, SimpleNamespace(model=moe), "fit")
    PostTrainingQuantization(methods=["int4"]).setup(None, SimpleNamespace(model=moe), "fit")
    with pytest.raises(ConfigError, match="int4_rotated"):
        PostTrainingQuantization(methods=["int4_rotated"]).setup(None, SimpleNamespace(model=moe), "fit")

    seen = {}
    real = quant_report.evaluate_methods

    def spy(model, methods, batches, **kw):
        seen["calib"], seen["val"] = kw.get("calib"), batches
        return real(model, methods, batches, **kw)

    monkeypatch.setattr("callbacks.post_training_quantization.evaluate_methods", spy)
    data = dict(source="kjv", seq_len=32, batch_size=4, vocab_size=1024, max_documents=60,
                cache_dir=os.environ.get("HAIPAI_TEST_CACHE", ".haipai_cache"))
    module = MoRLightningModule(ModelConfig(vocab_size=1024, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64,
                                            max_seq_len=64))
    ptq = PostTrainingQuantization(methods=["int4_gptq"], val_batches=1, decode_tokens=2, calib_batches=2)
    L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, accelerator="cpu", devices=1, logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              default_root_dir=str(tmp_path), callbacks=[ptq]).fit(module, datamodule=TextDataModule(**data))
    assert [r.method for r in ptq.rows] == ["int4_gptq"]
    assert len(seen["calib"]) == 2 and not any(torch.equal(c["input_ids"], v["input_ids"])
                                              for c in seen["calib"] for v in seen["val"])
