"""Training FLOPs actually spent, counted from what the routers decided.

IsoFLOP comparisons (the MoR paper's section 3) need the compute a routed model really
spent: a token that exits after one recursion costs one pass through the shared block.
We count matmul FLOPs (2 per multiply-accumulate) of one forward pass from the routing
records of that pass, and take training = 3 x forward (the backward pass costs about two
forwards: gradients for activations and for weights).

Counted: every Linear of every layer application on the tokens it processed; attention
score and value products over the (query, key) pairs actually formed (a sliding window
caps them); the output head. MoE / MoT: the router, plus the expert matmuls of the rows the
experts actually computed (the record's `expert_rows`: top-k assignments kept after capacity
drops, expert-choice picks, MoT group mixtures). Mamba: its projections, the depthwise
convolution and the scan (3 multiply-adds per state element and token), no attention pairs.
Token-routed attention (DTRNet): queries, keys and attention pairs for the routed fraction only (its
record's routed_fraction, else its capacity; pairs scale by the fraction squared), values and output
for every token (MindSkip, `routes_values`: values and output for the routed tokens only too). Not counted: norms, activations, softmax (all O(d) per token, < 1% here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haipai_lightning.model.routing.gate import capacity_k
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.model.routing.selection import spaced_mask


def _linear_macs(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(m.weight.numel() for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(n.endswith(s) for s in skip))


def step_masks(model, records: list[RouterRecord], B: int, T: int) -> tuple[list[torch.Tensor | None], dict]:
    """Per recursion step, the bool (B, T) mask of tokens that ran it (None = all); MoD masks by application."""
    nr = model.schedule.n_recursions
    steps: list[torch.Tensor | None] = [None] * nr
    mod: dict[int, torch.Tensor] = {}
    for rec in records:
        if rec.is_depth and rec.step is not None:  # bool (B, T): ran step `rec.step`
            steps[rec.step] = rec.selected
        elif rec.is_depth:  # int (B, T) depth in 1..Nr: depth i runs steps 0..i-1
            steps = [rec.selected > r for r in range(nr)]
        elif rec.group == "mod":
            mod[rec.application] = rec.selected
    return steps, mod


def expert_rows(model, records: list[RouterRecord]) -> dict[int, float]:
    """Rows the experts of routed MLPs computed, by layer application (records with a layer and application)."""
    apps: dict[int, list[int]] = {}
    for a, (layer_id, _) in enumerate(model.order):
        apps.setdefault(layer_id, []).append(a)
    out: dict[int, float] = {}
    for rec in records:
        if "expert_rows" not in rec.metrics or rec.layer is None or rec.application is None:
            continue
        i, n = rec.layer, rec.application  # the n-th application of unique layer i
        if n < len(apps.get(i, ())):
            out[apps[i][n]] = float(rec.metrics["expert_rows"])
    return out


def attention_fractions(model, records: list[RouterRecord]) -> dict[int, float]:
    """Fraction of a layer application's tokens a token-routed attention (DTRNet: `attention_fraction`)
    sent through attention, by application: from its records (`routed_fraction`), else its capacity."""
    apps: dict[int, list[int]] = {}
    for a, (layer_id, _) in enumerate(model.order):
        apps.setdefault(layer_id, []).append(a)
    out = {a: float(model.layers[i].mixer.attention_fraction) for a, (i, _) in enumerate(model.order)
           if hasattr(model.layers[i].mixer, "attention_fraction")}
    for rec in records:
        if "routed_fraction" in rec.metrics and rec.layer is not None and rec.application is not None:
            if rec.application < len(apps.get(rec.layer, ())):
                out[apps[rec.layer][rec.application]] = float(rec.metrics["routed_fraction"])
    return out


def _nominal_experts(mlp: torch.nn.Module) -> float:
    """Experts per token of a routed MLP when no record says (e.g. inside a Mixture-of-Depths layer)."""
    if hasattr(mlp, "group_size"):  # Mixture-of-Tokens: E mixtures per group of G tokens
        return mlp.n_experts / mlp.group_size
    return float(getattr(mlp, "top_k", getattr(mlp, "capacity_factor", 1.0)))


def _window_pairs(mask: torch.Tensor, w: int) -> torch.Tensor:
    """Causal (query, key) pairs under a sliding window of w *positions*, per row of mask (B, T) bool (the
    tokens that ran the layer application): a query at position p pairs with the keys that ran it at
    positions p - w + 1 .. p (attention's window is over absolute positions, routed or not)."""
    c = F.pad(mask.double().cumsum(1), (1, 0))  # (B, T + 1): c[:, p + 1] = selected tokens at positions <= p
    T = mask.size(1)
    p = torch.arange(T, device=mask.device)
    in_window = c[:, p + 1] - c[:, (p + 1 - w).clamp(min=0)]  # selected keys at positions p - w + 1 .. p
    return (in_window * mask).sum(1)


def forward_flops(model, records: list[RouterRecord], B: int, T: int) -> float:
    """Matmul FLOPs of one forward pass of `model` on a (B, T) batch, given its routing records."""
    cfg = model.cfg
    d_attn = cfg.n_heads * cfg.head_dim
    steps, mod = step_masks(model, records, B, T)
    shared_kv = cfg.kv_mode == "shared"
    full_pairs = B * T * (T + 1) / 2  # causal (query, key) pairs of a full sequence
    pos1 = torch.arange(1, T + 1)
    flops = 2.0 * B * T * cfg.d_model * cfg.vocab_size  # output head
    rows = expert_rows(model, records)
    fractions = attention_fractions(model, records)
    for a, (layer_id, r) in enumerate(model.order):
        layer = model.layers[layer_id]
        mask = mod.get(a) if r is None else steps[r]
        reuse = shared_kv and r is not None and r > 0
        if mask is None:
            tokens, pairs = B * T, full_pairs
        else:
            counts = mask.sum(1).double()
            tokens = float(counts.sum())
            # recursion-wise: the active tokens attend among themselves; shared KV: a query at
            # position p sees the p + 1 step-1 keys
            pairs = float((pos1 * mask).sum()) if reuse else float((counts * (counts + 1) / 2).sum())
        macs = _linear_macs(layer, skip=("mixer.wk", "mixer.wv") if reuse else ())
        mixer, mlp = layer.mixer, layer.mlp
        if hasattr(mixer, "macs_per_token"):  # a mixer that is not attention (Mamba): no pairs; its own MACs
            macs += mixer.macs_per_token() - _linear_macs(mixer)
            pairs = 0.0
        elif getattr(mixer, "window", None) is not None:
            w = mixer.window
            if reuse:
                pairs = float((pos1.clamp(max=w) * (mask if mask is not None else torch.ones(B, T))).sum())
            else:
                pairs = float(_window_pairs(torch.ones(B, T, dtype=torch.bool) if mask is None else mask, w).sum())
        if a in fractions:  # token-routed attention: queries, keys and pairs for the routed tokens only
            f = fractions[a]
            macs -= (1.0 - f) * (mixer.wq.weight.numel() + mixer.wk.weight.numel())
            if getattr(mixer, "routes_values", False):  # MindSkip: skipped tokens make no values / output either
                macs -= (1.0 - f) * (mixer.wv.weight.numel() + mixer.wo.weight.numel())
            pairs *= f * f  # the routed tokens attend among themselves
        flops += 2.0 * tokens * macs + 2.0 * 2.0 * pairs * d_attn  # QK^T and AV
        if getattr(mlp, "routed", False):  # expert matmuls on the rows actually dispatched
            n_rows = rows.get(a, tokens * _nominal_experts(mlp))
            flops += 2.0 * n_rows * mlp.experts.macs_per_row
    return flops


def training_flops(model, records: list[RouterRecord], B: int, T: int) -> float:
    return 3.0 * forward_flops(model, records, B, T)


def nominal_records(model, B: int, T: int) -> list[RouterRecord]:
    """Routing records of what the routers are *configured* to do, for planning without a forward.

    The depth router says (`Router.nominal_records`: expert-choice its capacities, token-choice a
    perfectly balanced split); Mixture-of-Depths its capacity (which tokens does not change a count:
    evenly spaced ones here); routed MLPs their top-k / capacity (no record: `_nominal_experts`).
    """
    records = list(model.router.nominal_records(B, T))
    for a in model.mod_gates:
        k = capacity_k(model.cfg.mod_capacity, T)
        records.append(RouterRecord("mod", None, selected=spaced_mask(B, T, k), application=int(a)))
    return records


def flops_per_token(model, seq_len: int) -> float:
    """Nominal training FLOPs per token of `model` at sequence length `seq_len` (IsoFLOP planning:
    budget = flops_per_token x tokens). Routed parts count at their configured capacities / top-k."""
    return training_flops(model, nominal_records(model, 1, seq_len), 1, seq_len) / seq_len
