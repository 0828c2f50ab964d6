"""HaipaiModel: shapes, sharing strategies, parameter counts, cache == no cache, learning."""

import pytest
from functools import partial

import torch
import torch.nn.functional as F

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.decode.sampling import SamplingConfig, sample_next
from haipai_lightning.decode.generate import generate
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.schedule import make_schedule
from helpers import tiny_config


small = partial(tiny_config, vocab_size=97, n_layers=8, n_recursions=1)  # the shared tiny model (helpers.TINY) with this file's sizes


STRATEGIES = [("cycle", 8, 2), ("sequence", 8, 4), ("middle_cycle", 8, 3), ("middle_sequence", 8, 2)]


@pytest.mark.parametrize("sharing,n_layers,nr", STRATEGIES)
def test_shapes_and_counts(sharing, n_layers, nr):
    cfg = small(sharing=sharing, n_layers=n_layers, n_recursions=nr)
    m = HaipaiModel(cfg)
    out = m(torch.randint(0, 97, (3, 11)))
    assert out.logits.shape == (3, 11, 97)
    sch = m.schedule
    n_unique = (2 + (n_layers - 2) // nr) if sharing.startswith("middle") else n_layers // nr
    assert len(m.layers) == sch.n_unique == n_unique
    assert len(sch.order()) == n_layers  # every effective layer applied once in the unrolled order
    block = sum(p.numel() for p in m.layers[0].parameters())
    embed = 97 * 32
    norm = 32
    counts = m.num_parameters()
    assert counts["unique"] == embed + n_unique * block + norm  # tied head adds nothing
    assert counts["effective"] == embed + n_layers * block + norm
    # parameters shrink by ~Nr in the shared part
    assert counts["effective"] - embed - norm == pytest.approx(nr * (counts["unique"] - embed - norm), rel=0.6)


def test_shared_weights_are_one_storage_and_run_nr_times():
    cfg = small(sharing="middle_cycle", n_layers=8, n_recursions=3)
    m = HaipaiModel(cfg)
    calls = {}
    for i, layer in enumerate(m.layers):
        layer.register_forward_hook(lambda mod, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    m(torch.randint(0, 97, (1, 5)))
    assert calls == {0: 1, 1: 3, 2: 3, 3: 1}
    # the orders name the same module object: one storage for every application
    ptrs = {m.layers[i].mlp.w1.weight.data_ptr() for i, r in m.schedule.order() if i == 1}
    assert len(ptrs) == 1
    # cycle order vs sequence order of the middle layers
    assert [i for i, _ in m.schedule.order()] == [0, 1, 2, 1, 2, 1, 2, 3]
    seq = make_schedule(small(sharing="middle_sequence", n_layers=8, n_recursions=3))
    assert [i for i, _ in seq.order()] == [0, 1, 1, 1, 2, 2, 2, 3]


def test_untied_head_counts():
    m = HaipaiModel(small(tie_embeddings=False, n_layers=2))
    assert m.head.weight.data_ptr() != m.embed.weight.data_ptr()
    tied = HaipaiModel(small(n_layers=2))
    assert m.num_parameters()["unique"] - tied.num_parameters()["unique"] == 97 * 32


@pytest.mark.parametrize("sharing,n_layers,nr", STRATEGIES)
def test_cache_equals_no_cache(sharing, n_layers, nr):
    m = HaipaiModel(small(sharing=sharing, n_layers=n_layers, n_recursions=nr)).eval()
    x = torch.randint(0, 97, (2, 20))
    full = m(x).logits
    cache = m.new_cache()
    pieces = [m(x[:, :7], cache=cache).logits]  # prefill
    pieces += [m(x[:, t : t + 1], cache=cache).logits for t in range(7, 12)]  # single steps
    pieces.append(m(x[:, 12:], cache=cache).logits)  # a chunk after a prefix
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seen == 20


def test_causal():
    m = HaipaiModel(small(n_recursions=3, sharing="middle_cycle")).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 97
    torch.testing.assert_close(m(x).logits[:, :9], m(y).logits[:, :9])
    assert not torch.allclose(m(x).logits[:, 9:], m(y).logits[:, 9:])


def test_loss_decreases_on_fixed_batch():
    m = HaipaiModel(small(n_recursions=3, sharing="middle_cycle"))
    x = torch.randint(0, 97, (4, 33))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = m(x[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=0.3)  # init ~ uniform
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(d_model=30, n_heads=4), "n_heads=4 does not divide model.config.d_model=30"),
        (dict(n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
        (dict(n_layers=7, n_recursions=3, sharing="middle_cycle"), "n_layers=7 cannot hold n_recursions=3"),
        (dict(n_layers=7, n_recursions=2, sharing="cycle"), "n_layers=7 cannot hold n_recursions=2"),
        (dict(n_recursions=5), "n_recursions=5 must be in 1..4"),
        (dict(sharing="spiral"), "sharing='spiral' is unknown"),
    ],
)
def test_bad_config_messages(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        small(**kw)
    assert "\n" not in str(e.value)


def test_presets():
    for name, eff in [("135m", 134e6), ("360m", 362e6)]:
        cfg = ModelConfig.from_preset(name)
        m = torch.device("meta")
        with m:
            model = HaipaiModel(cfg)
        assert model.num_parameters()["effective"] == pytest.approx(eff, rel=0.03)
    mor = ModelConfig.from_preset("360m", n_recursions=3, sharing="middle_cycle")
    assert make_schedule(mor).n_unique == 12  # 2 unique + 10 shared, as in the MoR paper


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    s = SamplingConfig(temperature=1.0, top_k=1, top_p=None)
    assert sample_next(logits, s, None).item() == 3
    s = SamplingConfig(temperature=0.0)
    assert sample_next(logits, s, None).item() == 3
    # top_p=0.6: sorted probs [0.64, 0.24, ...] -> only the top token survives
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.6), g).item() for _ in range(50)}
    assert picks == {3}
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_k=None, top_p=0.8), g).item() for _ in range(200)}
    assert picks == {2, 3}


def test_generate_uses_cache_and_matches_greedy_full_forward():
    m = HaipaiModel(small(n_recursions=3, sharing="middle_cycle")).eval()
    x = torch.randint(0, 97, (1, 5))
    out = generate(m, x, SamplingConfig(max_new_tokens=8, temperature=0))
    seq = x
    for _ in range(8):  # greedy without a cache
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, x, SamplingConfig(max_new_tokens=100))
