"""Growing a trained model: MoE upcycling, HyperCloning (width), Gstack (depth), as pure functions.

Each op takes a HaipaiModel and returns `(grown model, GrowthReport)`; the input model is never
modified. The report holds the parameter counts before / after and max |delta logits| on a probe
batch (evaluation mode: causal routing, dropless MoE). The architecture side (config + component
specs) is `grow.arch.grow_arch`, shared with checkpoint loading, which replays the growth log.

What each op preserves (tests/grow/test_growth.py asserts every line):

upcycle_to_moe(n_experts, top_k)
    Every dense SwiGLU becomes a TokenChoiceMoE whose experts are copies of it. With top-k
    renormalisation (the default) the output is sum_{e in topk} g_e f_e(x) with sum g_e = 1 and
    all f_e = f, i.e. f(x) for *any* router, so the router gets small random weights (std
    `router_std`, default the model's init_std) that break the symmetry between the copies.
    "Exact" then means: mathematically exact; in fp32 the gates sum to 1 within a few ulp, so
    |delta logits| <= 1e-6 relative. `router_std=0` gives uniform gates of exactly 1/k: for k a
    power of two every product and sum is exact in binary, and the logits are bit-identical
    (torch.equal) -- but every token then picks the same experts and the copies never separate,
    so it is for checking, not training. renormalize=False needs the uniform router (gates 1/E)
    and scales each expert's down projection by E/k (exact for E/k a power of two).

hyperclone(width_factor n)
    d_model, ffn hidden, expert hidden and the number of heads (query and key/value) grow n-fold;
    head_dim stays, so RoPE is untouched and new heads are copies of old ones. The residual
    stream becomes c [x, ..., x] (n copies): c = 1 with an untied head, c = 1/n with a tied one
    (the head is the embedding, so logits = (n c) E x needs n c = 1; RMSNorm's eps is scaled by
    c^2 so every norm returns exactly [norm(x), ..., norm(x)]). A weight whose input is
    replicated n times is tiled and divided by n (and by c for the routers that read the raw
    residual stream: MoR depth gates, MoD gates, token-choice depth router: their logits are
    unchanged, so routing is unchanged); a weight that writes into the residual stream (wo, w2,
    expert w2, the embedding) is multiplied by c. Noise off: equal up to fp32 rounding (tested
    1e-5 relative). `noise_snr_db`: paired noise N on the n input copies of every such weight,
    summing to zero over the copies, so it cancels exactly on the replicated input (function
    still equal up to rounding, documented bound 1e-4 relative for SNR >= 10 dB) while the
    copies get different gradients: cloned heads and hidden units diverge in training.

gstack(extra_layers | factor, how)
    Depth growth of the *shared block* (for a vanilla Nr=1 model: the whole stack). For MoR the
    shared block is where depth lives: one more unique layer there is Nr more effective layers
    at the cost of one layer of parameters (middle-cycle Nr=3: +1 unique layer = +3
    effective layers), the depth router keeps its per-step gates, and prelude/coda stay the unique
    embedding-side / head-side layers the MoR paper keeps unshared. `extra_layers=k` appends k
    copies of the block's last layer after it (depth up-scaling, arXiv 2312.15166); `factor=f` stacks the block f times
    (Gstack, arXiv 2405.15319). how="copy": trained weights (the function changes: the grown
    model is exactly the old one with the copied layers run again at their new places -- tested
    against that composition); how="identity": the copies' residual output projections are zero,
    so each new layer is the identity at growth and the logits are bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from haipai_lightning.config import ConfigError
from haipai_lightning.io.arch import arch_of, build_model
from haipai_lightning.grow.arch import grow_arch, gstack_layer_map
from haipai_lightning.grow.lesa import LESA, block_tensors
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.mlps.experts import Experts
from haipai_lightning.model.decoder import HaipaiModel

# default tolerance of the preservation check, relative to max |logits| (None: not function preserving)
DEFAULT_TOLERANCE = {"upcycle_to_moe": 1e-5, "hyperclone": 1e-4, "gstack": None, "lesa": None}
HYPERCLONE_NOISE_BOUND = 1e-4  # documented max relative |delta logits| with noise, SNR >= 10 dB


@dataclass
class GrowthReport:
    op: str
    args: dict[str, Any]
    params_before: dict[str, int]  # unique / effective
    params_after: dict[str, int]
    max_abs_dlogits: float  # max |logits_after - logits_before| on the probe batch
    max_abs_logits: float  # max |logits_before|, the scale of the relative figure
    probe_shape: tuple[int, int]
    # optimizer-state carry: new parameter name -> (old parameter name, how), how in
    # "same" (the same tensor), "copy" (a copy of it), "expert" (dense (H, D) -> every expert (E, D, H))
    param_map: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    @property
    def rel_dlogits(self) -> float:
        return self.max_abs_dlogits / max(self.max_abs_logits, 1e-30)

    def summary(self) -> dict[str, Any]:
        """Plain types only: goes into the growth log of the checkpoint and to TensorBoard."""
        d = asdict(self)
        d.pop("param_map")
        d["probe_shape"] = list(self.probe_shape)
        d["rel_dlogits"] = self.rel_dlogits
        return d


def grow(model: HaipaiModel, op: str, args: dict[str, Any] | None = None,
         probe: torch.Tensor | None = None) -> tuple[HaipaiModel, GrowthReport]:
    """Dispatch by name: grow(model, "hyperclone", {"width_factor": 2})."""
    fns = {"upcycle_to_moe": upcycle_to_moe, "hyperclone": hyperclone, "gstack": gstack, "lesa": lesa}
    if op not in fns:
        raise ConfigError(f"growth op={op!r} is unknown; use one of {', '.join(fns)}")
    return fns[op](model, probe=probe, **(args or {}))


# ------------------------------------------------------------------------------ upcycling
def upcycle_to_moe(model: HaipaiModel, n_experts: int = 8, top_k: int = 2, router_std: float | None = None,
                   probe: torch.Tensor | None = None, seed: int = 0, **moe_args: Any) -> tuple[HaipaiModel, GrowthReport]:
    """Every dense SwiGLU -> TokenChoiceMoE(n_experts, top_k, **moe_args) with copies of it as experts."""
    args = {"n_experts": n_experts, "top_k": top_k, **moe_args, **({} if router_std is None else {"router_std": router_std}),
            **({} if seed == 0 else {"seed": seed})}
    new = _build(model, "upcycle_to_moe", args)
    std = model.cfg.init_std if router_std is None else router_std
    gen = torch.Generator().manual_seed(seed)
    old_sd = model.state_dict()
    sd, pmap = {}, {}
    for name, t in new.state_dict().items():
        if name in old_sd:
            sd[name] = old_sd[name]
            pmap[name] = (name, "same")
        else:
            sd[name] = t  # the MoE's own fresh state (e.g. its zero balancing bias); overwritten below
    for i, (old_l, new_l) in enumerate(zip(model.layers, new.layers)):
        if not isinstance(old_l.mlp, SwiGLU):
            raise ConfigError(f"upcycle_to_moe: layer {i} has a {type(old_l.mlp).__name__} MLP, not a dense SwiGLU")
        moe = new_l.mlp
        renorm = getattr(moe, "renormalize", True)
        p = f"layers.{i}.mlp."
        for w in ("w1", "w3", "w2"):
            dense = getattr(old_l.mlp, w).weight  # (out, in)
            sd[p + f"experts.{w}"] = dense.t().unsqueeze(0).expand(moe.n_experts, -1, -1).clone()
            pmap[p + f"experts.{w}"] = (p + f"{w}.weight", "expert")
        if not renorm:  # raw gates: uniform router -> each of the k gates is 1/E; scale experts to sum to one
            sd[p + "experts.w2"] = sd[p + "experts.w2"] * (moe.n_experts / moe.top_k)
        r = torch.randn(moe.router.weight.shape, generator=gen) * std if renorm and std > 0 else \
            torch.zeros(moe.router.weight.shape)
        sd[p + "router.weight"] = r.to(moe.router.weight)
    return _finish(model, new, sd, pmap, "upcycle_to_moe", args, probe)


# ----------------------------------------------------------------------------- HyperCloning
# Linears that read the raw residual stream (not a normed copy): their input carries the factor c
_RAW_INPUT = re.compile(r"(router\.gates\.\d+|mod_gates\.\d+)\.(router|aux)\.weight|router\.mlp\.0\.weight")


def hyperclone(model: HaipaiModel, width_factor: int = 2, noise_snr_db: float | None = None, seed: int = 0,
               probe: torch.Tensor | None = None) -> tuple[HaipaiModel, GrowthReport]:
    """Widen n = width_factor times, preserving the function (module docstring)."""
    args = {"width_factor": width_factor, **({} if noise_snr_db is None else {"noise_snr_db": noise_snr_db}),
            **({} if seed == 0 else {"seed": seed})}
    new = _build(model, "hyperclone", args)
    n = width_factor
    c = 1.0 / n if model.cfg.tie_embeddings else 1.0
    gen = torch.Generator().manual_seed(seed)
    old_sd = model.state_dict()
    new_sd = new.state_dict()
    owner = {}  # tensor name -> (module, local name)
    for mname, mod in new.named_modules():
        for local, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owner[f"{mname}.{local}" if mname else local] = (mod, local)
    sd = {}
    for name, t in new_sd.items():
        old = old_sd[name]
        if name == "head.weight" and model.cfg.tie_embeddings:
            continue  # the embedding's tensor
        mod, local = owner[name]
        reps = [a // b for a, b in zip(t.shape, old.shape)]
        if any(a % b for a, b in zip(t.shape, old.shape)) or len(reps) != old.dim():
            raise ConfigError(f"hyperclone cannot widen {name}: {tuple(old.shape)} -> {tuple(t.shape)}")
        if isinstance(mod, nn.Embedding):
            w, in_dim = old.repeat(reps) * c, None  # (V, nD): writes the residual stream
        elif isinstance(mod, (nn.Linear, Experts)) and local in ("weight", "w1", "w2", "w3"):
            in_dim = 1  # Linear (out, in), Experts (E, in, out)
            scale = 1.0 / reps[in_dim]
            if _RAW_INPUT.fullmatch(name):
                scale /= c
            if getattr(mod, "is_residual_out", False) or (isinstance(mod, Experts) and local == "w2"):
                scale *= c
            w = old.repeat(reps) * scale
            if noise_snr_db is not None and reps[in_dim] > 1:
                w = w + _paired_noise(w, reps[in_dim], in_dim, noise_snr_db, gen)
        elif all(r == 1 for r in reps) or isinstance(mod, nn.RMSNorm):
            w = old.repeat(reps)  # norm gains tile; scalars and per-expert / per-depth buffers copy
        else:
            raise ConfigError(f"hyperclone does not know how to widen {name} of {type(mod).__name__}")
        sd[name] = w
    if model.cfg.tie_embeddings:
        sd["head.weight"] = sd["embed.weight"]
    return _finish(model, new, sd, {}, "hyperclone", args, probe)


def _paired_noise(w: torch.Tensor, n: int, dim: int, snr_db: float, gen: torch.Generator) -> torch.Tensor:
    """Noise (like w) whose n blocks along `dim` sum to zero: it cancels on an input of n equal copies."""
    std = float(w.float().std()) * 10 ** (-snr_db / 20)
    z = torch.randn(w.shape, generator=gen).to(w)
    blocks = z.unflatten(dim, (n, w.size(dim) // n))
    return ((blocks - blocks.mean(dim, keepdim=True)) * std).flatten(dim, dim + 1)


# ---------------------------------------------------------------------------------- Gstack
def gstack(model: HaipaiModel, extra_layers: int | None = None, factor: int | None = None, how: str = "copy",
           probe: torch.Tensor | None = None) -> tuple[HaipaiModel, GrowthReport]:
    """Deepen the shared block (module docstring); how = "copy" (Gstack) or "identity" (zero residual outputs)."""
    if how not in ("copy", "identity"):
        raise ConfigError(f"gstack: how={how!r}: use copy (trained copies) or identity (copies that start as identity)")
    args = {k: v for k, v in (("extra_layers", extra_layers), ("factor", factor)) if v is not None}
    args["how"] = how
    _, src = gstack_layer_map(model.cfg, extra_layers, factor)
    new = _build(model, "gstack", args)
    s_old, s_new = model.schedule, new.schedule
    # new unique id -> old unique id: prelude and the old shared layers keep theirs, the coda shifts
    keep = {i: i for i in list(s_old.prelude) + list(s_old.shared)}
    keep.update({j: i for i, j in zip(s_old.coda, s_new.coda)})
    old_mod = sorted(int(a) for a in model.mod_gates)
    new_mod = sorted(int(a) for a in new.mod_gates)
    if len(old_mod) != len(new_mod):
        raise ConfigError("gstack cannot grow a vanilla (n_recursions=1) model with Mixture-of-Depths layers: "
                          "the MoD layers would move; grow before turning on model.config.mod_capacity")
    mod_map = {str(b): str(a) for a, b in zip(old_mod, new_mod)}
    old_sd = model.state_dict()
    sd, pmap = {}, {}
    for name in new.state_dict():
        m = re.match(r"(layers|mod_gates)\.(\d+)\.(.*)", name)
        if m is None:
            src_name, how_map = name, "same"
        elif m.group(1) == "mod_gates":
            src_name, how_map = f"mod_gates.{mod_map[m.group(2)]}.{m.group(3)}", "same"
        else:
            j = int(m.group(2))
            i = keep.get(j, src[j])
            # a kept layer (the coda under a new index too) is the same tensor; a new one a copy
            src_name, how_map = f"layers.{i}.{m.group(3)}", "same" if j in keep else "copy"
        sd[name] = old_sd[src_name].clone()
        pmap[name] = (src_name, how_map)
    if how == "identity":
        for j, layer in enumerate(new.layers):
            if j in keep:
                continue
            for mname, mod in layer.named_modules():
                p = f"layers.{j}.{mname}."
                if getattr(mod, "is_residual_out", False):
                    sd[p + "weight"] = torch.zeros_like(sd[p + "weight"])
                if isinstance(mod, Experts):
                    sd[p + "w2"] = torch.zeros_like(sd[p + "w2"])
    return _finish(model, new, sd, pmap, "gstack", args, probe)


def lesa(model: HaipaiModel, extra_layers: int = 1, hidden: int = 16, steps: int = 100, seed: int = 0,
         probe: torch.Tensor | None = None) -> tuple[HaipaiModel, GrowthReport]:
    """LESA (arXiv 2502.13794; grow/lesa.py): gstack(extra_layers)'s shape, but each new layer of the shared
    block is predicted from its neighbours (the block's last layer, or the previous new one, and the layer
    that follows the block: the coda's first, or the block's first under a cycle without coda) by an SVD +
    MLP fitted on the model's consecutive unique layers. Not function preserving: the report measures it."""
    args = {"extra_layers": extra_layers, **{k: v for k, v, d in (("hidden", hidden, 16), ("steps", steps, 100),
                                                                    ("seed", seed, 0)) if v != d}}
    grown, rep = gstack(model, extra_layers=extra_layers, how="copy", probe=probe)
    s_old, s_new = model.schedule, grown.schedule
    old_sd = model.state_dict()
    seq = [block_tensors(old_sd, i) for i in list(s_old.prelude) + list(s_old.shared) + list(s_old.coda)]
    predictor = LESA(seq, hidden=hidden, steps=steps, seed=seed)
    sd = {k: v.clone() for k, v in grown.state_dict().items()}
    prev = block_tensors(old_sd, s_old.shared[-1])
    nxt = block_tensors(old_sd, s_old.coda[0] if len(s_old.coda) else s_old.shared[0])
    for j in list(s_new.shared)[len(s_old.shared):]:
        prev = predictor.predict(prev, nxt)
        sd.update({f"layers.{j}.{k}": v for k, v in prev.items()})
    return _finish(model, _build(model, "lesa", args), sd, rep.param_map, "lesa", args, probe)


# ---------------------------------------------------------------------------------- shared
def _build(model: HaipaiModel, op: str, args: dict[str, Any]) -> HaipaiModel:
    p = next(model.parameters())
    return build_model(grow_arch(arch_of(model), op, args), device=p.device)


def default_probe(model: HaipaiModel, batch: int = 2, seq: int = 32) -> torch.Tensor:
    """A fixed batch of random tokens (seeded; leaves the global RNG alone): (batch, seq)."""
    g = torch.Generator().manual_seed(1234)
    seq = min(seq, model.cfg.max_seq_len)
    return torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=g).to(next(model.parameters()).device)


@torch.no_grad()
def eval_logits(model: HaipaiModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits in evaluation mode (causal routing, dropless MoE), restoring the training flags."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return model(input_ids).logits.float()
    finally:
        for m, f in flags.items():
            m.train(f)


def _finish(old: HaipaiModel, new: HaipaiModel, sd: dict[str, torch.Tensor], pmap: dict, op: str,
            args: dict[str, Any], probe: torch.Tensor | None) -> tuple[HaipaiModel, GrowthReport]:
    p = next(old.parameters())
    new.load_state_dict({k: v.to(p.device) for k, v in sd.items()})
    new.to(dtype=p.dtype)
    new.train(old.training)
    probe = default_probe(old) if probe is None else probe
    before, after = eval_logits(old, probe), eval_logits(new, probe)
    report = GrowthReport(op, dict(args), old.num_parameters(), new.num_parameters(),
                          float((after - before).abs().max()), float(before.abs().max()),
                          tuple(probe.shape), pmap)
    return new, report
