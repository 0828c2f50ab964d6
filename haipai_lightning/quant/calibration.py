"""Calibration data and second-order statistics for the calibrated quantizers (GPTQ, GuidedQuant).

`collect_stats` runs the model over calibration batches with probes on chosen linears and on
the experts of routed MLPs, and returns for every probed matrix its Hessian H = 2 X^T X / M
(GPTQ, arXiv 2210.17323 section 3) from the inputs X (M, K) the matrix really saw:
- a linear of a MoR shared block is applied Nr times per forward: its probe sees the inputs of
  every recursion step (and only the tokens the depth router sent there);
- an expert e of a MoE / MoT MLP: the rows dispatched to it (tokens routed to e, or MoT's
  mixtures), for w1 / w3 (its input) and for w2 (its SwiGLU hidden silu(x w1) * (x w3));
- with `guided_groups` = G > 0 the linears' Hessians are GuidedQuant's (arXiv 2505.07004, section
  3.2): the squared end-loss gradients w.r.t. the layer outputs weight every token, averaged within
  G groups of output channels, one Hessian per group (guided.py). This needs labels and a backward.

A probe replaces the linear by a wrapper for the duration of the pass (a forward hook would miss
the fused gate/up and q/k/v matmuls the training path takes with gradients on). With no calibration
data, `sample_calibration` draws sequences from the model itself (data-free calibration in the
spirit of LLM-QAT, arXiv 2305.17888 section 2.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.quant.guided import guided_hessians

Batch = dict[str, torch.Tensor]


@torch.no_grad()
def sample_calibration(model: nn.Module, n: int = 8, seq: int = 64, seed: int = 0, temperature: float = 1.0) -> list[Batch]:
    """n sequences of seq + 1 tokens sampled from the model (cached decoding), as one batch with labels."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    seq = min(seq, model.cfg.max_seq_len - 1)
    ids = torch.randint(0, model.cfg.vocab_size, (n, 1), generator=g)
    cache = model.new_cache(seq + 1)
    nxt = ids
    for _ in range(seq):
        logits = model(nxt, cache=cache).logits[:, -1].float() / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    return [{"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}]


class _Probe(nn.Module):
    """Runs the wrapped linear and accumulates its input statistics (and, guided, its output grads)."""

    def __init__(self, lin: nn.Module, key: str, stats: dict, groups: int) -> None:
        super().__init__()
        self.lin, self.key, self.stats, self.groups = lin, key, stats, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        x2 = x.detach().reshape(-1, x.size(-1)).double()
        if not self.groups:
            _accumulate(self.stats, self.key, x2)
        elif y.requires_grad:
            def hook(gy: torch.Tensor, x2=x2) -> None:
                hs = guided_hessians(x2, gy.detach().reshape(-1, gy.size(-1)).double(), self.groups)
                _accumulate(self.stats, self.key, None, hs, x2.size(0))
            y.register_hook(hook)
        return y


def _accumulate(stats: dict, key: str, x2: torch.Tensor | None, h: torch.Tensor | None = None, m: int = 0) -> None:
    if x2 is not None:
        h, m = 2 * x2.T @ x2, x2.size(0)
    if key in stats:
        stats[key][0].add_(h)
        stats[key][1] += m
    else:
        stats[key] = [h.clone(), m]


def _expert_probe(experts: nn.Module, key: str, stats: dict) -> None:
    """Instance-level wrappers of Experts.sorted_rows / batched that accumulate per-expert Hessians."""
    sorted_rows, batched = experts.sorted_rows, experts.batched

    def add(e: int, xe: torch.Tensor) -> None:
        if xe.size(0) == 0:
            return
        xe = xe.detach().double()
        h = F.silu(xe @ experts.w1[e].double()) * (xe @ experts.w3[e].double())
        _accumulate(stats, f"{key}.{e}.in", xe)
        _accumulate(stats, f"{key}.{e}.hidden", h)

    def probed_sorted(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        for e, xe in enumerate(x.split(counts.tolist())):
            add(e, xe)
        return sorted_rows(x, counts)

    def probed_batched(x: torch.Tensor) -> torch.Tensor:
        for e in range(x.size(0)):
            add(e, x[e])
        return batched(x)

    experts.sorted_rows, experts.batched = probed_sorted, probed_batched


def collect_stats(model: nn.Module, batches: list[Batch], linears: dict[str, tuple[nn.Module, str]],
                  experts: dict[str, nn.Module] | None = None, guided_groups: int = 0) -> dict[str, torch.Tensor]:
    """Hessians of the probed matrices over the batches (model in eval mode: causal routing).

    linears: key -> (parent, attribute) of an nn.Linear; experts: key -> Experts module.
    Returns key -> H (K, K) float64 (guided: (G, K, K)), normalised by the rows seen; an expert's
    keys are f"{key}.{e}.in" and f"{key}.{e}.hidden" (absent when no row reached expert e)."""
    stats: dict = {}
    experts = experts or {}
    originals = {}
    for key, (parent, name) in linears.items():
        originals[key] = getattr(parent, name)
        setattr(parent, name, _Probe(originals[key], key, stats, guided_groups))
    for key, ex in experts.items():
        _expert_probe(ex, key, stats)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    try:
        for b in batches:
            if guided_groups:
                for p in model.parameters():
                    p.requires_grad_(False)
                with torch.enable_grad():
                    h = model.embed(b["input_ids"])  # a leaf that needs grad, so the graph reaches the probes
                    h.requires_grad_(True)
                    logits = _forward_from_embedding(model, b["input_ids"], h)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)
                    loss.backward()
            else:
                with torch.no_grad():
                    model(b["input_ids"])
    finally:
        for key, (parent, name) in linears.items():
            setattr(parent, name, originals[key])
        for ex in experts.values():
            for attr in ("sorted_rows", "batched"):
                ex.__dict__.pop(attr, None)
        for m, f in flags.items():
            m.train(f)
        for p, r in req.items():
            p.requires_grad_(r)
    return {k: v[0] / max(v[1], 1) for k, v in stats.items()}


def _forward_from_embedding(model: nn.Module, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """model(ids).logits with the embedding output replaced by the leaf h (same values)."""
    embed = model.embed

    class _Fixed(nn.Module):
        def forward(self, _ids: torch.Tensor) -> torch.Tensor:
            return h

    model.embed = _Fixed()
    try:
        return model(ids).logits
    finally:
        model.embed = embed


def unique_layer_order(model: nn.Module) -> list[int]:
    """Unique layer ids in the order of their first application (prelude, shared block, coda)."""
    seen: dict[int, None] = {}
    for i, _ in model.order:
        seen.setdefault(i, None)
    return list(seen)


def block_linears(layer: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str]]:
    """key -> (parent, attribute) for every nn.Linear inside a block's mixer and (dense) MLP."""
    out = {}
    for part_name in ("mixer", "mlp"):
        part = getattr(layer, part_name)
        if getattr(part, "routed", False):  # the router of a routed MLP stays fp32; its experts are separate
            continue
        for pname, parent in part.named_modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    out[".".join(filter(None, (prefix, part_name, pname, name)))] = (parent, name)
    return out
