"""MindSkip: attention with dynamic depth, for router tuning (He et al. 2024, arXiv 2410.13184).

Router-Tuning takes a trained model, freezes it, and adds a Mixture-of-Depths router in front of
the attention of each layer; only the routers train (callbacks/router_tuning.py). MindSkip skips the
*attention* sub-layer only (the paper's finding: attention layers are the redundant ones; skipping
whole blocks or MLPs costs more quality). Per layer and per token:

    training   the top `capacity x T` tokens of a sequence by the router's score run the attention
               (MoD's expert choice, arXiv 2404.02258), the others skip it;
    inference  a token runs it when sigmoid(logit) > 0.5 (causal), the decision the BCE auxiliary
               loss teaches to imitate the top-k (TopKGate, as Haipai's MoD layers).

The chosen tokens are gathered into a (B, k, D) tensor, attend among themselves with their original
RoPE positions (and leave keys/values in the decoding cache only for themselves), and are scattered
back: skipped tokens cost no projection and no attention row (real compute saved).

Output of a chosen token: the base model's attention output times a straight-through gate,
    y = attn(x) * (1 + sigmoid(l) - stopgrad(sigmoid(l)))
whose value is exactly 1, so with capacity 1 the layer IS the base attention (the frozen model's
function is kept where the router says "run"), while the gradient d loss / d l = sigmoid'(l) <dL/dy,
attn(x)> tells the router how much the token's attention output helps the loss. (MindSkip weights the
output by the router score; with a frozen base that rescales every attention output, so a
straight-through gate is used instead.)

A subclass of Attention with the same projections (wq, wk, wv, wo): a base checkpoint's weights load
into it unchanged; the router (`skip_router`) is the only new parameter. `layers` limits skipping to
some unique layers (the others run plain attention).
"""

from __future__ import annotations

from typing import Sequence

import torch

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.routing.gate import TopKGate, capacity_k, capacity_k_rows
from haipai_lightning.model.routing.record import RouterRecord, next_application
from haipai_lightning.model.routing.selection import Selection


class MindSkipAttention(Attention):
    """Attention that a per-layer Mixture-of-Depths router lets each token skip (router tuning).

    A routed mixer (`routed = True`): each call appends a RouterRecord `mindskip/layer<i>/<n>`
    (scores (B, T) router probabilities, selected bool (B, T) ran the attention, aux `bce` in
    training; metrics `capacity` (realised fraction), `sampling_acc`).
    """

    routed = True
    routes_values = True  # FLOP counting (analysis/flops.py): a skipped token computes no q, k, v or output

    def __init__(self, cfg: ModelConfig, capacity: float = 0.5, layers: Sequence[int] | None = None,
                 aux_loss_weight: float = 0.01, window: int | None = None, flash: bool = True,
                 flex: bool = False) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            capacity: fraction of each sequence's tokens that run the attention of a routed layer.
            layers: unique layer ids whose attention is routed (None = every layer with this mixer).
            aux_loss_weight: weight of the BCE loss teaching the causal threshold the top-k decision.
            window, flash, flex: as Attention.
        """
        super().__init__(cfg, window=window, flash=flash, flex=flex)
        if not 0 < capacity <= 1:
            raise ConfigError(f"model.mixer.init_args.capacity={capacity} must be in (0, 1]: the fraction of tokens "
                              "that run each routed attention layer")
        if cfg.kv_mode == "shared":
            raise ConfigError("model.mixer MindSkipAttention routes each attention layer's tokens on their own; "
                              "model.config.kv_mode=shared reuses step 1's keys of every token: use recursion_wise")
        self.capacity, self.aux_loss_weight = capacity, aux_loss_weight
        self.layers = None if layers is None else {int(i) for i in layers}
        self.skip_router = TopKGate(cfg.d_model)
        self.layer_index = 0  # set by the Block

    @property
    def skipping(self) -> bool:
        return self.layers is None or self.layer_index in self.layers

    @property
    def attention_fraction(self) -> float:
        """The configured fraction of tokens that run this attention (FLOP planning; records say the realised)."""
        return self.capacity if self.skipping else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None,
                records: list[RouterRecord] | None = None) -> torch.Tensor:
        """x (B, T, D) the normed input (the gathered tokens of a routed step, pads per `valid`)."""
        if not self.skipping:
            return super().forward(x, cos, sin, kv, share, valid)
        B, T, _ = x.shape
        if valid is None and kv is not None:  # with a cache the routed step's pads are marked in the view
            valid = kv.valid
        if not self.training and T == 1 and self.capacity < 1:  # a decoding step: one threshold, no top-k
            logit = self.skip_router.threshold_logit(x)  # (B, 1)
            run = (torch.sigmoid(logit) > 0.5) & (valid if valid is not None else True)
            if records is not None:
                frac = run.float().mean()
                records.append(RouterRecord("mindskip", None, torch.sigmoid(logit.detach()), run, {}, {},
                                            {"capacity": frac, "routed_fraction": frac}, layer=self.layer_index,
                                            application=next_application(records, "mindskip", self.layer_index)))
            if not bool(run.any()):
                return torch.zeros_like(x)  # the whole batch skips this attention
            if bool((run == (valid if valid is not None else True)).all()):
                return super().forward(x, cos, sin, kv, share, valid)  # gate value 1 (no gradient in decoding)
        cand = Selection(None, valid, T)  # every row's real tokens are the candidates
        n_real = valid.sum(1) if valid is not None else torch.full((B,), T, device=x.device)
        k = capacity_k(self.capacity, T) if valid is None else capacity_k_rows(
            torch.full((B,), self.capacity, device=x.device), n_real)
        # capacity 1 runs every token in training, so inference does too (as expert-choice MoR's steps)
        use_thr = not self.training and self.capacity < 1
        sel, logits, aux, metrics = self.skip_router.decide(x, cand, k, use_threshold=use_thr)
        mask = sel.mask(B, x.device) & (valid if valid is not None else True)  # (B, T) ran the attention
        metrics["capacity"] = mask.sum() / n_real.sum().clamp(min=1)
        metrics["routed_fraction"] = metrics["capacity"]  # FLOP counting reads it (analysis/flops.py)
        if records is not None:
            records.append(RouterRecord("mindskip", None, torch.sigmoid(logits.detach()), mask, aux,
                                        {"bce": self.aux_loss_weight}, metrics, layer=self.layer_index,
                                        application=next_application(records, "mindskip", self.layer_index)))
        out = torch.zeros_like(x)
        if sel.idx is not None and sel.idx.size(1) == 0:
            return out  # every token skips: no attention at all
        if not self.training and bool((mask == (valid if valid is not None else True)).all()):
            # every real token runs (a decoding step whose token the router keeps): no gather needed
            y = super().forward(x, cos, sin, kv, share, valid)
            p = torch.sigmoid(logits[..., None])
            return y * (1 + p - p.detach())
        pos = self._positions(B, T, kv, share, x.device)  # (B, T) absolute positions
        sub_pos = sel.positions(pos)  # (B, k)
        sub_valid = sel.valid if sel.valid is not None else None
        if valid is not None and sel.idx is not None:  # a pad candidate picked by top-k stays a pad
            picked = sel.gather(valid[..., None]).squeeze(-1)
            sub_valid = picked if sub_valid is None else sub_valid & picked
        sub_kv = KVView(kv.kv, sub_pos, kv.rows, sub_valid) if kv is not None else None
        cos, sin = (c if c.dim() == 4 else c[None].expand(B, *c.shape) for c in (cos, sin))  # (B, T, 1, hd/2)
        y = super().forward(sel.gather(x), sel.gather(cos), sel.gather(sin), sub_kv,
                            KVShare.at(sub_pos) if kv is None else None, sub_valid)
        p = torch.sigmoid(sel.gather(logits[..., None]))  # (B, k, 1)
        y = y * (1 + p - p.detach())  # value 1: the base attention; gradient: the router's
        return sel.scatter(out, y)

    @staticmethod
    def _positions(B: int, T: int, kv: KVView | None, share: KVShare | None, device: torch.device) -> torch.Tensor:
        """Absolute positions of the T tokens: the routed step's / the cache's, else 0..T-1 (a full sequence)."""
        pos = share.q_pos if share is not None and share.q_pos is not None else None
        pos = kv.positions if pos is None and kv is not None else pos
        pos = torch.arange(T, device=device) if pos is None else pos
        return pos if pos.dim() == 2 else pos[None].expand(B, T)
