"""Post-training quantization: exact rotations, real low-bit storage, accuracy, KV caches, the report."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.quant.hadamard import hadamard, random_orthogonal
from haipai_lightning.quant.kv_cache import QuantKVCacheFactory
from haipai_lightning.model.mlps.moe import TokenChoiceMoE
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.quant.layers import QLinear
from haipai_lightning.quant.qtensor import fake_quant_tokens
from haipai_lightning.eval.quant_report import evaluate_methods, perplexity, size_on_disk
from haipai_lightning.quant.methods import QuantSpec, quantize_model
from haipai_lightning.quant.rotation import rotate_model
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter
from helpers import train_on_kjv

V = 97


def small(router=ExpertChoiceRouter, **kw):
    cfg = dict(vocab_size=V, d_model=48, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
               n_recursions=3, sharing="middle_cycle")
    m = HaipaiModel(ModelConfig(**{**cfg, **kw}), router=router).eval()
    with torch.no_grad():  # non-trivial norm gains (trained models have them) and decisive routers
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
        for p in list(m.router.parameters()) + list(m.mod_gates.parameters()):
            p.mul_(40)
    return m


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("n", [12, 48, 192, 512, 384])
def test_hadamard_is_orthogonal(n):
    h = hadamard(n)
    assert bool((h.abs() == 1).all())
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_orthogonal(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))


CASES = {
    "ec_mod_tied_gqa": dict(mod_capacity=0.5, tie_embeddings=True),
    "tc_untied": dict(router=TokenChoiceRouter, tie_embeddings=False),
    "hybrid_mamba": dict(mixer_pattern="AM"),
    "kv_shared_mqa": dict(kv_mode="shared", n_kv_heads=1),
}


@pytest.mark.parametrize("case", CASES)
def test_rotation_leaves_fp32_logits_unchanged(case):
    m = small(**CASES[case])
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        ref = m(x).logits
        r = copy.deepcopy(m)
        rotate_model(r, seed=5)
        out = r(x).logits
    assert rel(out, ref) < 1e-4
    assert not r.cfg.tie_embeddings and r.head.weight is not r.embed.weight  # rotation unties (head = E diag(g) Q)
    assert all(bool((layer.mixer_norm.weight == 1).all()) for layer in r.layers)  # gains fused into the linears
    assert rel(r.embed.weight, m.embed.weight) > 0.5  # the weights really changed


def test_rotation_refuses_moe_and_round_to_nearest_stores_its_experts():
    m = HaipaiModel(ModelConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64),
                    mlp=lambda cfg: TokenChoiceMoE(cfg, n_experts=4, top_k=2, expert_hidden=32)).eval()
    with pytest.raises(ConfigError, match="routed MLPs"):
        quantize_model(m, "int4_rotated")
    quantize_model(m, "kv4")  # the KV cache alone is fine
    from haipai_lightning.quant.qexperts import QExperts

    x = torch.randint(0, V, (2, 12))
    for method in ("int8", "int4"):  # round-to-nearest experts: stored low-bit, router kept fp32, decodes
        q = quantize_model(m, method)
        assert isinstance(q.layers[0].mlp.experts, QExperts) and isinstance(q.layers[0].mlp.router, nn.Linear)
        with torch.no_grad():
            full = q(x).logits
            cache = q.new_cache(12)
            steps = torch.cat([q(x[:, t:t + 1], cache=cache).logits for t in range(12)], 1)
            assert rel(full, m(x).logits) < (0.02 if method == "int8" else 0.2)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    # the callback refuses rotated methods at setup, before any training
    from types import SimpleNamespace

    from callbacks import PostTrainingQuantization

    with pytest.raises(ConfigError, match="PostTrainingQuantization methods \\['int4_rotated'\\]"):
        PostTrainingQuantization(methods=["int4_rotated", "int8"]).setup(None, SimpleNamespace(model=m), "fit")
    PostTrainingQuantization(methods=["int8", "kv4"]).setup(None, SimpleNamespace(model=m), "fit")


def test_weights_are_really_low_bit():
    m = small(tie_embeddings=True)
    q8, q4 = quantize_model(m, "int8"), quantize_model(m, "int4")
    assert q8.layers[0].mixer.wq.qw.qweight.dtype == torch.int8
    w = q4.layers[0].mlp.w2.qw  # (48, 64) int4: two codes per byte
    assert w.qweight.dtype == torch.uint8 and tuple(w.qweight.shape) == (48, 32)
    assert q4.head.qw is q4.embed.qw  # tied: one low-bit table for both
    fp = size_on_disk(m)
    assert size_on_disk(q8) < 0.32 * fp
    assert size_on_disk(q4) < 0.22 * fp


@pytest.mark.parametrize("bits,act", [(8, None), (8, 8), (4, None), (4, 4)])
def test_qlinear_kernels_compute_the_quantized_product(bits, act):
    lin = torch.nn.Linear(192, 96, bias=False)
    q = QLinear.from_linear(lin, bits, 32, act)
    x = torch.randn(5, 192)
    y = q(x)
    w = q.qw.dequantize()
    if act == 8:  # dynamic int8 activations: per-token absmax codes times the int8 weight codes
        s = x.abs().amax(-1, keepdim=True) / 127
        ref = (torch.round(x / s) * s) @ w.T
    else:
        ref = F.linear(fake_quant_tokens(x, act) if act else x, w)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert rel(y, lin(x)) < (0.02 if bits == 8 else 0.2)  # and it is close to the fp32 layer


def test_online_hadamard_is_exact_without_quantization_error():
    """w2's online Hadamard: (x H)(W H)^T == x W^T, so only the quantization error remains."""
    lin = torch.nn.Linear(64, 48, bias=False)
    q = QLinear.from_linear(lin, 8, 32, None, online_hadamard=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x @ q.hadamard, q.qw.dequantize()), q(x), atol=1e-4, rtol=1e-4)
    assert rel(q(x), lin(x)) < 0.02


def test_quantized_kv_cache_decodes_like_its_prefill_and_stores_fewer_bytes():
    m = small()
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        ref = m(x).logits
        fp_cache = m.new_cache()
        m(x, cache=fp_cache)
        for bits, tol in ((8, 5e-3), (4, 6e-2)):
            m.kv_cache_factory = QuantKVCacheFactory(bits)
            full = m(x, cache=m.new_cache()).logits
            c = m.new_cache()
            steps = torch.cat([m(x[:, :8], cache=c).logits] + [m(x[:, t:t + 1], cache=c).logits for t in range(8, 20)], 1)
            # every vector is quantized on its own, so step-by-step decoding == one quantized prefill
            torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
            assert rel(full, ref) < tol
            assert c.nbytes() < (0.35 if bits == 8 else 0.25) * fp_cache.nbytes()
            assert c.layers[1].k.dtype == (torch.int8 if bits == 8 else torch.uint8)
    m.kv_cache_factory = None


def test_quantspec_errors_name_the_field():
    with pytest.raises(ConfigError, match="weights=3"):
        QuantSpec(weights=3)
    with pytest.raises(ConfigError, match="needs weights=8"):
        QuantSpec(weights=4, activations=8)
    with pytest.raises(ConfigError, match="--method 'int3'"):
        quantize_model(small(), "int3")


def plant_outliers(model, s=30.0, n=3, seed=1):
    """Function-preserving activation outliers, the kind LLMs grow: n channels of every normed residual
    input (RMSNorm gain x s, the reading columns / s) and of every SwiGLU hidden (up rows x s, down
    columns / s). The fp32 logits do not change; the activations the linears see have s-fold outliers."""
    o = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in o.layers:
            at, mlp = layer.mixer, layer.mlp
            for norm, readers in ((layer.mixer_norm, [at.wq, at.wk, at.wv]), (layer.mlp_norm, [mlp.w1, mlp.w3])):
                c = torch.randperm(o.cfg.d_model, generator=g)[:n]
                norm.weight[c] *= s
                for lin in readers:
                    lin.weight[:, c] /= s
            j = torch.randperm(mlp.w2.in_features, generator=g)[:n]
            mlp.w3.weight[j] *= s
            mlp.w2.weight[:, j] /= s
    return o


def test_rotation_beats_plain_int4_on_planted_activation_outliers():
    torch.manual_seed(0)
    m = HaipaiModel(ModelConfig(vocab_size=256, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                max_seq_len=64, n_recursions=3), router=ExpertChoiceRouter).eval()
    o = plant_outliers(m)
    x = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        ref = m(x).logits
        assert rel(o(x).logits, ref) < 1e-5  # planting preserves the function
        err = {name: rel(quantize_model(o, QuantSpec(**spec, embeddings=False))(x).logits, ref) for name, spec in {
            "int4": dict(weights=4), "int4_rotated": dict(weights=4, rotate=True),
            "w4a4": dict(weights=4, activations=4), "w4a4_rotated": dict(weights=4, activations=4, rotate=True),
        }.items()}
    assert err["int4_rotated"] < 0.5 * err["int4"], err  # measured ~0.28x
    assert err["w4a4_rotated"] < 0.4 * err["w4a4"], err  # measured ~0.23x


# ------------------------------------------------------------------ trained quickstart-shaped model
@pytest.fixture(scope="module")
def trained():
    """The quickstart architecture (d=192, 5 layers, GQA 4/2, SwiGLU 512, MoR expert-choice Nr=3, tied)
    trained briefly on King James Bible text, with the validation blocks of the same data."""
    cfg = ModelConfig(vocab_size=1024, d_model=192, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=512,
                      max_seq_len=128, n_recursions=3, sharing="middle_cycle")
    m, _, dm = train_on_kjv(lambda: HaipaiModel(cfg, router=ExpertChoiceRouter), steps=30)
    val = [b for _, b in zip(range(3), dm.val_dataloader())]
    return m.eval(), val


def test_int8_weight_only_perplexity_within_one_percent(trained):
    m, val = trained
    fp = perplexity(m, val)
    assert fp < 400  # it learned something (uniform would be 1024)
    ppl8 = perplexity(quantize_model(m, "int8"), val)
    assert abs(ppl8 / fp - 1) < 0.01, (fp, ppl8)


def test_report_covers_every_method(trained):
    m, val = trained
    rows = evaluate_methods(m, ["int8", "int8_dynamic", "int4", "kv4"], val[:1], new_tokens=2, reps=1)
    by = {r.method: r for r in rows}
    assert by["int8"].size_mb_after < 0.3 * by["int8"].size_mb_before
    assert by["int4"].size_mb_after < by["int8"].size_mb_after
    assert by["kv4"].size_mb_after == pytest.approx(by["kv4"].size_mb_before, rel=1e-3)  # weights untouched
    assert by["kv4"].kv_bytes_per_token < 0.2 * by["int8"].kv_bytes_per_token
    assert by["int8_dynamic"].ppl_change_pct < 2.0
    assert all(math.isfinite(r.ppl_after) and r.decode_tok_s_after > 0 for r in rows)


def test_callback_and_commands_end_to_end(tmp_path):
    """fit -> PostTrainingQuantization (table + TensorBoard) -> `haipai quantize` -> `haipai export` -> load."""
    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from callbacks import PostTrainingQuantization
    from datamodules import TextDataModule
    from haipai_lightning.cli.main import main
    from haipai_lightning.train.module import MoRLightningModule

    data = dict(source="kjv", seq_len=64, batch_size=8, vocab_size=1024, max_documents=120,
                cache_dir=os.environ.get("HAIPAI_TEST_CACHE", ".haipai_cache"))
    module = MoRLightningModule(ModelConfig(vocab_size=1024, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                                            ffn_hidden=128, max_seq_len=128, n_recursions=1),
                                router=None)
    ptq = PostTrainingQuantization(methods=["int8", "kv4"], val_batches=1, decode_tokens=2)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, accelerator="cpu", devices=1,
                        logger=TensorBoardLogger(str(tmp_path), name="run"), enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ptq, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])
    trainer.fit(module, datamodule=TextDataModule(**data))
    assert [r.method for r in ptq.rows] == ["int8", "kv4"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(trainer.logger.log_dir))

    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    main(["quantize", "--ckpt_path", ckpt, "--method", "int8", "--data", str(tmp_path / "config.yaml"),
          "--val_batches", "1", "--decode_tokens", "2", "--out", str(tmp_path / "q8"),
          "--log_dir", str(tmp_path / "tb")])
    assert os.listdir(tmp_path / "tb")
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "fp")])
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        ref = module.model.eval()(x).logits
        assert torch.equal(HaipaiModel.from_pretrained(str(tmp_path / "fp"))(x).logits, ref)
        assert rel(HaipaiModel.from_pretrained(str(tmp_path / "q8"))(x).logits, ref) < 0.02
    with pytest.raises(SystemExit):  # a bad method is one line naming the choices
        main(["quantize", "--ckpt_path", ckpt, "--method", "int3"])
