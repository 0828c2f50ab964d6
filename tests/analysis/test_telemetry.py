"""Router telemetry: the maths on hand-built records, then what a short `fit` writes to TensorBoard."""

import glob
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from callbacks.router_telemetry import specialization_table
from haipai_lightning.cli.main import main
from haipai_lightning.config import ModelConfig
from haipai_lightning.analysis.depth_picture import palette, render_png
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.analysis.telemetry import DeadTokenTracker, choice_load, choice_token_counts, depth_histogram, depth_token_counts, entropy, extra_depth, layer_grad_norms, logit_stats, max_vio, router_stats, token_depth

ROOT = Path(__file__).parents[2]
SMALL = ["--data.max_documents", "60", "--data.vocab_size", "512", "--data.seq_len", "32", "--data.batch_size", "4"]


def ec(r: int, sel: list[int]) -> RouterRecord:
    """An expert-choice step record over one sequence."""
    s = torch.tensor([sel], dtype=torch.bool)
    return RouterRecord("depth", "expert_choice", torch.where(s, 0.7, 0.2), s,
                        {"bce": torch.tensor(0.5)}, {"bce": 0.001}, {"capacity": s.float().mean()}, step=r)


# ------------------------------------------------------------------ maths
def test_expert_choice_depth_histogram_entropy_and_fractions():
    recs = [ec(0, [1, 1, 1, 1, 1, 1]), ec(1, [1, 1, 1, 1, 0, 0]), ec(2, [1, 1, 0, 0, 0, 0])]
    depth, mx = token_depth(recs)
    assert depth.tolist() == [[3, 3, 2, 2, 1, 1]] and mx == 3
    assert depth_histogram(depth, mx).tolist() == [0, 2, 2, 2]
    assert entropy(depth_histogram(depth, mx)).item() == pytest.approx(math.log(3))
    assert entropy(torch.tensor([0, 5, 0])).item() == 0.0  # everyone at one depth
    # the capacity-1 first step routes nothing, so the extra depth is what steps 2..3 decided
    assert extra_depth(recs).tolist() == [[2, 2, 1, 1, 0, 0]]
    s = router_stats(recs)
    assert s["depth/mean_depth"].item() == pytest.approx(2.0)
    assert s["depth/depth_entropy"].item() == pytest.approx(math.log(3))
    assert s["depth/step1/selected_frac"].item() == pytest.approx(4 / 6)
    assert s["depth/step2/aux/bce"].item() == 0.5 and "depth/step2/capacity" in s
    assert "depth/step1/max_vio" not in s  # a yes/no router has no load per choice


def test_token_choice_load_and_max_vio():
    depth = torch.tensor([[1, 1, 1, 1, 2, 2, 3, 3]])
    rec = RouterRecord("depth", "token_choice", torch.full((1, 8, 3), 1 / 3), depth)
    load = choice_load(rec)
    assert load.tolist() == [0.5, 0.25, 0.25]
    assert max_vio(load).item() == pytest.approx((0.5 - 1 / 3) / (1 / 3))  # = 0.5
    assert max_vio(torch.tensor([0.25] * 4)).item() == 0.0 and max_vio(torch.tensor([1.0, 0, 0, 0])).item() == 3.0
    d, mx = token_depth([rec])
    assert torch.equal(d, depth) and mx == 3 and depth_histogram(d, mx).tolist() == [0, 4, 2, 2]
    assert extra_depth([rec]).tolist() == [[0, 0, 0, 0, 1, 1, 2, 2]]
    s = router_stats([rec])
    assert s["depth/token_choice/load/depth1"].item() == 0.5
    assert s["depth/token_choice/max_vio"].item() == pytest.approx(0.5)


def test_moe_records_are_handled_without_knowing_them():
    ids = torch.tensor([[0, 1, 0, 1]])  # expert ids (B, T, k=2), 0-based
    top2 = torch.tensor([[[0, 1], [0, 2], [0, 1], [0, 3]]])
    as_bool = torch.zeros(1, 4, 4, dtype=torch.bool).scatter(-1, top2, True)  # the same as (B, T, E) bool
    for sel in (top2, as_bool):
        rec = RouterRecord("moe", "topk", torch.full((1, 4, 4), 0.25), sel, layer=2)
        assert choice_load(rec).tolist() == [0.5, 0.25, 0.125, 0.125]
        s = router_stats([rec])
        assert s["moe/layer2/max_vio"].item() == pytest.approx(1.0)  # (0.5 - 0.25) / 0.25
        assert s["moe/layer2/load/expert3"].item() == 0.125 and "moe/mean_depth" not in s
        assert token_depth([rec]) is None and extra_depth([rec]) is None
        counts = choice_token_counts(ids, rec, vocab_size=2)  # (E, V): token 0 went to experts 0 and 1 twice
        assert counts.tolist() == [[2, 2], [2, 0], [0, 1], [0, 1]]


def test_depth_token_counts_and_specialization_table():
    ids = torch.tensor([[5, 5, 7, 7, 7, 9]])
    depth = torch.tensor([[3, 3, 3, 1, 1, 2]])
    counts = depth_token_counts(ids, depth, 3, vocab_size=10)
    assert counts[3, 5] == 2 and counts[3, 7] == 1 and counts[1, 7] == 2 and counts[2, 9] == 1
    assert counts.sum() == 6 and counts[0].sum() == 0

    class Tok:
        def decode(self, i):
            return f"t{i[0]}"

    md = specialization_table(counts, Tok(), top=2, rec=None).splitlines()
    assert md[0].startswith("| depth |") and len(md) == 2 + 3  # depth 0 is empty: no row
    assert md[-1] == "| depth3 | 3 | `t5` 2 (100%), `t7` 1 (33%) |"


def test_dead_token_ratio_over_a_sliding_window():
    t = DeadTokenTracker(window=2, vocab_size=10)
    t.update(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 0, 0, 0]]))
    t.update(torch.tensor([[2, 3, 5, 6]]), torch.tensor([[1, 0, 0, 0]]))
    r = t.ratios()  # ids seen {1..6}, alive {1, 2}; only position 0 was ever alive
    assert r["dead_token_ratio"].item() == pytest.approx(4 / 6)
    assert r["dead_position_ratio"].item() == pytest.approx(3 / 4)
    t.update(torch.tensor([[3, 3, 7, 7]]), torch.tensor([[0, 2, 0, 0]]))
    r = t.ratios()  # window = updates 2..3: seen {2, 3, 5, 6, 7}, alive {2, 3}; id 1 left the window
    assert r["dead_token_ratio"].item() == pytest.approx(3 / 5)
    assert r["dead_position_ratio"].item() == pytest.approx(2 / 4)
    resumed = DeadTokenTracker(window=2, vocab_size=10)  # the callback's checkpoint state
    resumed.load_state_dict(t.state_dict())
    assert {k: v.item() for k, v in resumed.ratios().items()} == {k: v.item() for k, v in r.items()}
    # through records: a capacity-1 step keeps every token alive in name only
    recs = [ec(0, [1, 1, 1, 1]), ec(1, [0, 1, 0, 0])]
    t2 = DeadTokenTracker(window=5, vocab_size=10)
    t2.update(torch.tensor([[1, 2, 3, 3]]), extra_depth(recs))
    assert t2.ratios()["dead_token_ratio"].item() == pytest.approx(2 / 3)  # ids 1 and 3 never went deeper


def test_logit_stats_recover_router_logits():
    logits = torch.tensor([[-2.0, 0.0, 2.0]])
    scores = torch.cat([torch.sigmoid(logits), torch.zeros(1, 1)], 1)  # the 0 = a token the step did not score
    s = logit_stats(RouterRecord("depth", "expert_choice", scores, scores > 0.5, step=1))
    assert s["logit_mean"].item() == pytest.approx(0.0, abs=1e-5)
    assert s["logit_std"].item() == pytest.approx(2.0, abs=1e-4)
    assert s["logit_max"].item() == pytest.approx(2.0, abs=1e-4)
    probs = torch.tensor([[[1.0, 2.0, 3.0]]]).softmax(-1)  # softmax: logits up to a shift -> centred (-1, 0, 1)
    s = logit_stats(RouterRecord("depth", "token_choice", probs, torch.tensor([[3]])))
    assert s["logit_mean"].item() == pytest.approx(0.0, abs=1e-5) and s["logit_max"].item() == pytest.approx(1.0)


def test_layer_grad_norms_per_layer():
    from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16,
                      n_recursions=3, sharing="middle_cycle")
    m = HaipaiModel(cfg, router=ExpertChoiceRouter)
    out = m(torch.randint(0, 64, (2, 16)))
    (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
    norms = layer_grad_norms(m)
    assert list(norms) == ["embed", "L0", "L1", "L2", "router", "head"]  # input to output; tied head = final norm
    manual = torch.cat([p.grad.flatten() for p in m.layers[1].parameters()]).norm()
    assert norms["L1"].item() == pytest.approx(manual.item(), rel=1e-5)
    assert norms["head"].item() == pytest.approx(m.norm.weight.grad.norm().item(), rel=1e-5)


def test_render_png_colours_tokens_by_depth():
    img = render_png(["In", " the", " beginning"], [1, 2, 3], 3)
    top = img.crop((0, 0, img.width, img.height // 2))  # the token line, above the legend
    colours = {c for _, c in top.getcolors(1 << 16)}
    assert set(palette(3)[1:]) <= colours and len(set(palette(5))) == 6


def test_every_config_has_router_telemetry():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cbs = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        assert "callbacks.RouterTelemetry" in [c["class_path"] for c in cbs], path.name


# ---------------------------------------------------------- a real fit
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("config", ["quickstart.yaml", "mor_token_choice.yaml"])
def test_fit_logs_router_telemetry_then_visualize(config, cache, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = [{"class_path": "callbacks.RouterTelemetry", "init_args": {"log_every_n_steps": 2}}]
    main(["fit", "--config", str(ROOT / "configs" / config), *SMALL, "--data.cache_dir", cache,
          "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", json.dumps(cb),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
          "--trainer.num_sanity_val_steps", "0"])
    run = Path(glob.glob(str(tmp_path / "lightning_logs" / "version_*"))[0])
    ev = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    ev.Reload()
    tags = ev.Tags()
    scalars = set(tags["scalars"])
    common = {"router/depth/mean_depth", "router/depth/depth_entropy", "router/depth/dead_token_ratio",
              "router/depth/dead_position_ratio", "grad_norm/embed", "grad_norm/L0", "grad_norm/L2",
              "grad_norm/router", "val/router/depth/mean_depth", "val/router/depth/depth_entropy"}
    if config == "quickstart.yaml":
        want = {"router/depth/step1/selected_frac", "router/depth/step2/selected_frac", "router/depth/step1/aux/bce",
                "router/depth/step1/logit_std", "router/depth/step2/sampling_acc",
                "val/router/depth/step2/selected_frac"}
    else:
        want = {"router/depth/token_choice/max_vio", "router/depth/token_choice/load/depth3",
                "router/depth/token_choice/aux/balance", "router/depth/token_choice/aux/z_loss",
                "router/depth/token_choice/logit_max", "val/router/depth/token_choice/max_vio"}
    assert common | want <= scalars, sorted(common | want - scalars)
    # only the logging steps (every 2 optimizer steps), training and gradients alike
    assert [e.step for e in ev.Scalars("router/depth/mean_depth")] == [2, 4, 6, 8]
    assert [e.step for e in ev.Scalars("grad_norm/L1")] == [2, 4, 6, 8]
    assert [e.step for e in ev.Scalars("val/router/depth/mean_depth")] == [4, 8]
    last = {t: ev.Scalars(t)[-1].value for t in scalars if t.startswith("router/")}
    if config == "quickstart.yaml":  # top-k of 32 tokens at capacities 1, 2/3, 1/3 keeps 32, 21, 10
        assert last["router/depth/step1/selected_frac"] == pytest.approx(21 / 32)
        assert last["router/depth/step2/selected_frac"] == pytest.approx(10 / 32)
        assert last["router/depth/mean_depth"] == pytest.approx((32 + 21 + 10) / 32)
    else:  # MaxVio is the loads' (max - mean) / mean
        loads = [last[f"router/depth/token_choice/load/depth{d}"] for d in (1, 2, 3)]
        assert sum(loads) == pytest.approx(1.0)
        assert last["router/depth/token_choice/max_vio"] == pytest.approx((max(loads) - 1 / 3) * 3, abs=1e-5)
        assert last["router/depth/mean_depth"] == pytest.approx(loads[0] + 2 * loads[1] + 3 * loads[2], abs=1e-5)
    assert "router/depth/depth" in tags["histograms"]
    hist = ev.Histograms("router/depth/depth")[-1].histogram_value
    assert hist.num == 4 * 32 and 1 <= hist.min <= hist.max <= 3  # every token of the batch, depths 1..3
    assert "router/depth/depth_picture" in tags["images"]
    assert "router/depth/specialization/text_summary" in tags["tensors"]
    table = ev.Tensors("router/depth/specialization/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.startswith("| depth |") and "| depth3 |" in table

    png, page = run / "depth_8.png", run / "depth_8.html"
    assert png.exists() and page.exists() and (run / "depth_4.png").exists()
    assert len(Image.open(png).convert("RGB").getcolors(1 << 16)) > 1
    token_part = page.read_text().split("</p><p>")[0]  # before the legend
    assert len(set(re.findall(r'title="depth (\d)"', token_part))) > 1  # tokens of more than one depth

    capsys.readouterr()
    main(["visualize", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--text", "And God said, Let there be "
          "light: and there was light.", "--out", str(tmp_path / "vis")])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "vis" / "depth.png"), str(tmp_path / "vis" / "depth.html")]
    assert len(Image.open(printed[0]).convert("RGB").getcolors(1 << 16)) > 1
    shown = re.sub(r"<[^>]+>", "", Path(printed[1]).read_text().split("<p>")[1])  # the tokens' text, tags removed
    assert shown.startswith("And God said, Let there be light")


def test_callback_on_hand_built_records_logs_on_its_steps_and_skips_gathered_moe():
    """The callback alone (stub trainer and logger): interval, dead window, MoE inside a MoR step."""
    from types import SimpleNamespace

    from callbacks import RouterTelemetry

    class Logger:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

    ids = torch.tensor([[1, 2, 3, 3]])
    moe_full = RouterRecord("moe", "token_choice", torch.full((1, 4, 3), 1 / 3),
                            torch.tensor([[[0, 1], [0, 2], [1, 2], [0, 1]]]), layer=0, application=0)
    moe_step = RouterRecord("moe", "token_choice", torch.full((1, 2, 3), 1 / 3),  # 2 gathered tokens
                            torch.tensor([[[0, 1], [2, 1]]]), layer=1, application=1)
    recs = [ec(0, [1, 1, 1, 1]), ec(1, [0, 1, 0, 0]), moe_full, moe_step]
    module = SimpleNamespace(last_records=recs, last_val_records=recs, device=torch.device("cpu"),
                             model=SimpleNamespace(cfg=SimpleNamespace(vocab_size=10)))
    log = Logger()
    trainer = SimpleNamespace(global_step=0, loggers=[log], sanity_checking=False)
    cb = RouterTelemetry(log_every_n_steps=2, window=10)
    for step in range(1, 5):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, {"input_ids": ids}, step - 1)
    assert [s for s, _ in log.logged] == [2, 4]
    m = log.logged[-1][1]
    assert m["router/depth/dead_token_ratio"] == pytest.approx(2 / 3)  # ids 1 and 3 never went beyond step 1
    assert m["router/moe/layer0/0/max_vio"] == pytest.approx((3 / 8 - 1 / 3) / (1 / 3))  # loads 3/8, 3/8, 2/8
    assert m["router/moe/layer1/1/load/expert1"] == 0.5 and m["router/depth/mean_depth"] == 1.25
    cb.on_validation_epoch_start(trainer, module)
    cb.on_validation_batch_end(trainer, module, None, {"input_ids": ids}, 0)
    assert set(cb._spec) == {"depth", "moe/layer0/0"}  # the gathered step cannot be mapped to token ids
    assert cb._val["val/router/moe/layer1/1/load/expert1"].compute().item() == 0.5
    assert cb._val["val/router/depth/step1/selected_frac"].compute().item() == 0.25
