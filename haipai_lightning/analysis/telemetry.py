"""Router telemetry maths: pure functions over `RouterRecord`s (no trainer, no logger).

Everything is derived from a record's typed fields, `scores` and `selected`, so depth routers,
Mixture-of-Depths and MoE routers are handled by the same code:

- a bool (B, T) selection is a yes/no decision: "fraction selected";
- an int selection (B, T) or (B, T, k), or a bool (B, T, E) one, picks among choices:
  "load per choice" and MaxVio. Depth routers (`rec.is_depth`) report a
  depth in 1..Nr (`TokenChoiceRouter`); other routers (MoE) report ids in 0..E-1.

Records are grouped by `RouterRecord.telemetry_group` ("depth" for every recursion step, "mod",
"moe/layer2" for every application of that layer). Within a group, the per-token *depth* is the sum of the (B, T)
selections: a bool counts 1 (expert-choice: the number of recursion steps a token ran;
MoD: the number of gated layers it ran), an int depth counts as is (token-choice).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from haipai_lightning.model.routing.record import RouterRecord

LOGIT_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before logit(): |logit| <= 13.8


# ----------------------------------------------------------------- records
def group_name(rec: RouterRecord) -> str:
    """'depth' (every step of the depth router), 'mod', 'moe/layer2' (every application of that layer)."""
    return rec.telemetry_group


def group_records(records: Iterable[RouterRecord]) -> dict[str, list[RouterRecord]]:
    """Records by group, in the order the model emitted them."""
    groups: dict[str, list[RouterRecord]] = {}
    for rec in records:
        groups.setdefault(group_name(rec), []).append(rec)
    return groups


def is_depth_int(rec: RouterRecord) -> bool:
    """An int (B, T) selection that *is* a depth in 1..Nr (token-choice depth routing)."""
    sel = rec.selected
    return sel is not None and sel.dim() == 2 and sel.dtype != torch.bool and rec.is_depth


def adds_depth(rec: RouterRecord) -> bool:
    """Does this record contribute to its group's per-token depth? (bool (B, T) or an int depth)."""
    sel = rec.selected
    return sel is not None and sel.dim() == 2 and (sel.dtype == torch.bool or is_depth_int(rec))


def is_choice(rec: RouterRecord) -> bool:
    """Does this record pick among several choices (depths or experts)?"""
    sel = rec.selected
    return sel is not None and not (sel.dtype == torch.bool and sel.dim() == 2)


def selected_fraction(rec: RouterRecord) -> torch.Tensor | None:
    """Fraction of the (B, T) tokens a yes/no router selected (0-d); None for choice routers."""
    sel = rec.selected
    if sel is None or sel.dtype != torch.bool or sel.dim() != 2:
        return None
    return sel.float().mean()


def token_depth(records: Sequence[RouterRecord]) -> tuple[torch.Tensor, int] | None:
    """Per-token depth (B, T) long of one group, and the largest depth the group can give.

    Expert-choice: number of steps that selected the token (1..Nr when step 1 keeps all);
    token-choice: its depth 1..Nr; MoD: number of gated layers it ran (0..n_layers).
    None when no record of the group makes a (B, T) decision (e.g. MoE only), or when its records
    saw different token sets (MindSkip in a shared layer: each recursion step's gathered tokens).
    """
    parts = [r for r in records if adds_depth(r)]
    if not parts or len({r.selected.shape for r in parts}) > 1:  # e.g. a routed mixer seeing gathered steps
        return None
    depth = sum(r.selected.long() for r in parts)  # (B, T)
    max_depth = sum(_n_choices(r) if is_depth_int(r) else 1 for r in parts)
    return depth, max_depth


def extra_depth(records: Sequence[RouterRecord]) -> torch.Tensor | None:
    """Per-token depth *beyond the first step* (B, T) long: what the router actually decided.

    A bool decision that selected every token of the batch routes nothing (MoR's capacity-1
    first step) and is not counted; a token-choice depth i counts i - 1 (step 1 always runs).
    So for MoR, extra depth >= 1 <=> "selected beyond step 1"; for MoD, "ran a gated layer".
    No host sync: the all-selected test stays a tensor.
    """
    parts = [r for r in records if adds_depth(r)]
    if not parts or len({r.selected.shape for r in parts}) > 1:
        return None
    out = torch.zeros_like(parts[0].selected, dtype=torch.long)
    for r in parts:
        if is_depth_int(r):
            out = out + (r.selected.long() - 1)
        else:
            out = out + (r.selected & ~r.selected.all()).long()
    return out


def depth_histogram(depth: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Token counts per depth 0..max_depth: (max_depth + 1,) long."""
    return torch.bincount(depth.flatten().long(), minlength=max_depth + 1)[: max_depth + 1]


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats, 0-d) of the distribution given by non-negative counts; 0 log 0 = 0."""
    p = counts.float() / counts.sum().clamp(min=1)
    return -(p * torch.log(p.clamp(min=1e-30))).sum()


# ------------------------------------------------------------------ loads
def _n_choices(rec: RouterRecord) -> int:
    if rec.scores is not None and rec.scores.dim() == 3:
        return rec.scores.size(-1)
    sel = rec.selected
    if sel.dtype == torch.bool:
        return sel.size(-1)
    return int(sel.max()) + (0 if rec.is_depth else 1)  # host sync; only without scores


def choice_counts(rec: RouterRecord) -> torch.Tensor | None:
    """Assignments per choice (E,) long: how many (token, slot) pairs went to each depth / expert.

    Choice index 0 is depth 1 for depth routers and expert 0 for MoE routers. None for a
    yes/no (B, T) bool record.
    """
    if not is_choice(rec):
        return None
    sel, n = rec.selected, _n_choices(rec)
    if sel.dtype == torch.bool:  # (B, T, E): expert e took the token
        return sel.flatten(0, -2).long().sum(0)
    ids = sel.flatten().long() - (1 if rec.is_depth else 0)
    return torch.bincount(ids, minlength=n)[:n]


def choice_load(rec: RouterRecord) -> torch.Tensor | None:
    """Fraction of the assignments per choice (E,), summing to 1; None for yes/no records."""
    c = choice_counts(rec)
    return None if c is None else c.float() / c.sum().clamp(min=1)


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max load - mean load) / mean load (0-d): 0 when balanced, E - 1 when one choice takes all."""
    load = load.float()
    return (load.max() - load.mean()) / load.mean().clamp(min=1e-12)


def choice_token_counts(ids: torch.Tensor, rec: RouterRecord, vocab_size: int) -> torch.Tensor | None:
    """(E, V) long: how often each token id (input_ids (B, T)) was sent to each choice; None for yes/no."""
    if not is_choice(rec):
        return None
    sel, n = rec.selected, _n_choices(rec)
    if sel.dtype == torch.bool:  # (B, T, E)
        onehot = sel.long()
    else:
        base = 1 if rec.is_depth else 0
        s = sel if sel.dim() == 3 else sel[..., None]  # (B, T, k)
        onehot = torch.zeros(*s.shape[:2], n, dtype=torch.long, device=s.device)
        onehot.scatter_add_(-1, s.long() - base, torch.ones_like(s, dtype=torch.long))
    out = torch.zeros(n, vocab_size, dtype=torch.long, device=ids.device)
    out.index_add_(1, ids.flatten(), onehot.flatten(0, 1).T.contiguous())
    return out


def depth_token_counts(ids: torch.Tensor, depth: torch.Tensor, max_depth: int, vocab_size: int) -> torch.Tensor:
    """(max_depth + 1, V) long: how often each token id (B, T) ended at each depth 0..max_depth."""
    flat = depth.flatten() * vocab_size + ids.flatten()
    return torch.bincount(flat, minlength=(max_depth + 1) * vocab_size)[: (max_depth + 1) * vocab_size].view(
        max_depth + 1, vocab_size)


# ----------------------------------------------------------------- scores
def logit_stats(rec: RouterRecord) -> dict[str, torch.Tensor]:
    """Router logit mean / std / max (0-d each), recovered from the record's probabilities.

    (B, T) scores are sigmoid probabilities: logit = log(p / (1 - p)), exact up to the clamp
    (LOGIT_EPS). Zeros mark tokens the router did not score (expert-choice steps > 1 score
    only the candidates) and are left out. (B, T, E) scores are softmax probabilities, which
    fix the logits only up to a per-token constant: we report the centred logits
    log p - mean_e log p (= logits - their mean over choices).
    """
    s = rec.scores
    if s is None:
        return {}
    s = s.float()
    if s.dim() == 2:
        scored = s != 0
        x = torch.logit(s.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
        n = scored.sum().clamp(min=1)
        mean = (x * scored).sum() / n
        var = (((x - mean) * scored) ** 2).sum() / (n - 1).clamp(min=1)
        mx = x.masked_fill(~scored, float("-inf")).max()
        return {"logit_mean": mean, "logit_std": var.sqrt(), "logit_max": mx}
    logp = torch.log(s.clamp(min=1e-30))
    x = logp - logp.mean(-1, keepdim=True)
    return {"logit_mean": x.mean(), "logit_std": x.std(), "logit_max": x.max()}


def choice_label(rec: RouterRecord, i: int) -> str:
    """Name of choice index i: 'depth{i+1}' for depth routers, 'expert{i}' otherwise."""
    return f"depth{i + 1}" if rec.is_depth else f"expert{i}"


def router_stats(records: Sequence[RouterRecord], max_load_scalars: int = 16) -> dict[str, torch.Tensor]:
    """Every scalar statistic of one forward's records, '<record or group>/<stat>' -> 0-d tensor.

    Per record: selected_frac (yes/no routers); load/<choice> (when there are at most
    `max_load_scalars` choices) and max_vio (choice routers); logit_mean/std/max; aux/<term>
    (unweighted); the record's own metrics (capacity, sampling_acc, ...). Per group with a
    per-token depth: mean_depth and depth_entropy (nats).
    """
    stats: dict[str, torch.Tensor] = {}
    for rec in records:
        p = f"{rec.name}/"
        frac = selected_fraction(rec)
        if frac is not None:
            stats[p + "selected_frac"] = frac
        load = choice_load(rec)
        if load is not None:
            stats[p + "max_vio"] = max_vio(load)
            if load.numel() <= max_load_scalars:
                stats.update({p + f"load/{choice_label(rec, i)}": v for i, v in enumerate(load)})
        stats.update({p + k: v for k, v in logit_stats(rec).items()})
        stats.update({p + f"aux/{k}": v for k, v in rec.aux_losses.items()})
        for k, v in rec.metrics.items():  # the router's own view; ours wins on a clash (same maths)
            stats.setdefault(p + k, torch.as_tensor(v))
    for g, recs in group_records(records).items():
        d = token_depth(recs)
        if d is not None:
            depth, mx = d
            stats[f"{g}/mean_depth"] = depth.float().mean()
            stats[f"{g}/depth_entropy"] = entropy(depth_histogram(depth, mx))
    return stats


# ------------------------------------------------------------ dead tokens
class DeadTokenTracker:
    """Dead-token ratio over a sliding window of the last `window` updates (training steps).

    Definitions (one update = one training batch, input_ids (B, T) and extra depth (B, T)):
    an occurrence of a token is *alive* if the router sent it beyond the first step
    (`extra_depth` >= 1: MoR's "selected beyond step 1"; for MoD "ran a gated layer").

    - dead_token_ratio: among the token ids that occurred in the window, the fraction whose
      every occurrence in the window was not alive (the MoR paper's dead tokens, by id).
    - dead_position_ratio: among the sequence positions 0..T-1, the fraction at which no
      sequence of the window had an alive token (a router that never routes early or late
      positions shows up here).

    Kept as "last step seen" / "last step alive" per id and per position, updated with
    scatter-max, so an update costs O(B*T) on the device and never syncs with the host.
    """

    def __init__(self, window: int, vocab_size: int) -> None:
        self.window, self.vocab_size = window, vocab_size
        self.step = 0
        self.seen = self.alive = None  # (V,) long: last update at which the id occurred / was alive
        self.pos_alive = None  # (T,) long: last update with an alive token at the position

    def update(self, ids: torch.Tensor, extra: torch.Tensor) -> None:
        """ids (B, T) token ids, extra (B, T) depth beyond the first step."""
        self.step += 1
        if self.seen is None:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.long, device=ids.device)
            self.alive = torch.zeros_like(self.seen)
        elif self.seen.device != ids.device:  # restored from a checkpoint on the CPU
            self.seen, self.alive = self.seen.to(ids.device), self.alive.to(ids.device)
        T = ids.size(1)
        if self.pos_alive is None or self.pos_alive.numel() < T or self.pos_alive.device != ids.device:
            grown = torch.zeros(T, dtype=torch.long, device=ids.device)
            if self.pos_alive is not None:
                n = min(T, self.pos_alive.numel())
                grown[:n] = self.pos_alive[:n].to(ids.device)
            self.pos_alive = grown
        s = torch.full_like(ids, self.step)
        alive = extra >= 1  # (B, T)
        self.seen.scatter_reduce_(0, ids.flatten(), s.flatten(), reduce="amax")
        self.alive.scatter_reduce_(0, ids.flatten(), torch.where(alive, s, 0).flatten(), reduce="amax")
        pos_step = torch.where(alive.any(0), self.step, 0)  # (T,)
        self.pos_alive[:T] = torch.maximum(self.pos_alive[:T], pos_step)

    def ratios(self) -> dict[str, torch.Tensor]:
        """{'dead_token_ratio', 'dead_position_ratio'} (0-d tensors) over the current window."""
        if self.seen is None:
            return {}
        start = max(self.step - self.window, 0)  # updates start+1..step are in the window; 0 = never
        in_window = self.seen > start
        dead = in_window & (self.alive <= start)
        return {"dead_token_ratio": dead.sum() / in_window.sum().clamp(min=1),
                "dead_position_ratio": (self.pos_alive <= start).float().mean()}

    def state_dict(self) -> dict:
        return {"step": self.step, "seen": self.seen, "alive": self.alive, "pos_alive": self.pos_alive}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seen, self.alive, self.pos_alive = (state["step"], state["seen"], state["alive"],
                                                            state["pos_alive"])


# ------------------------------------------------------------- gradients
def layer_grad_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the gradients (0-d each) per part of a HaipaiModel, input to output.

    'embed', 'L0'.. 'L{n-1}' (the unique layers `model.layers`, so a shared layer's norm sums
    all its recursions), 'router' (depth router and MoD gates) and 'head' (final norm plus an
    untied output matrix; a tied one is the embedding and is counted there). Parts without
    gradients are left out. One norm per parameter, no host sync.
    """
    parts: list[tuple[str, nn.Module | None]] = [("embed", getattr(model, "embed", None))]
    parts += [(f"L{i}", layer) for i, layer in enumerate(getattr(model, "layers", []))]
    parts += [("router", getattr(model, "router", None)), ("router", getattr(model, "mod_gates", None)),
              ("head", getattr(model, "norm", None)), ("head", getattr(model, "head", None))]
    seen: set[int] = set()
    sq: dict[str, list[torch.Tensor]] = {}
    for name, mod in parts:
        if mod is None:
            continue
        for p in mod.parameters():
            if id(p) in seen or p.grad is None:
                continue
            seen.add(id(p))
            sq.setdefault(name, []).append(torch.linalg.vector_norm(p.grad.detach().float()) ** 2)
    return {k: torch.stack(v).sum().sqrt() for k, v in sq.items()}


def to_floats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """0-d tensors -> finite floats, with one host transfer (not one sync per value)."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    out = {k: float(v) for k, v in stats.items() if not torch.is_tensor(v)}
    if keys:
        dev = stats[keys[0]].device
        out.update(zip(keys, torch.stack([stats[k].detach().float().reshape(()).to(dev) for k in keys]).tolist()))
    return {k: v for k, v in out.items() if math.isfinite(v)}
