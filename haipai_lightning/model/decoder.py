"""HaipaiModel: embedding -> recursion stack (prelude, Nr shared steps, coda) -> head.

Components are injected as factories `Callable[[ModelConfig], nn.Module]`: the
mixer (attention, later Mamba), the MLP (SwiGLU, later MoE / MoT) and the depth
router. The model returns logits, the auxiliary losses and the routing records;
it never logs and never touches a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from haipai_lightning.model.cache import KVCache, KVView
from haipai_lightning.model.activation_checkpointing import checkpointed_layer
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.rope import RotaryEmbedding
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.mamba import Mamba
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.routing.selection import Selection
from haipai_lightning.model.schedule import make_schedule
from haipai_lightning.model.routing.base import FullRecursion
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.model.routing.gate import TopKGate, capacity_k, capacity_k_rows
from haipai_lightning.model.budget import budget_record, budget_scale

Factory = Callable[[ModelConfig], nn.Module]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, name -> scalar
    records: list[RouterRecord] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

    `index` is the unique layer id and `name` ("layer3") names the records of a routed MLP
    (MoE / MoT: class attribute `routed = True`, forward(x, records)), which receives the
    forward pass's `records` list. Every mixer takes (x, cos, sin, kv, share); one without
    keys/values (Mamba) ignores `share`: under kv_mode=shared it runs on each step's active tokens.
    """

    def __init__(self, cfg: ModelConfig, mixer: Factory, mlp: Factory, index: int = 0) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = mlp(cfg)
        self.index, self.name = index, f"layer{index}"
        self.routed_mlp = bool(getattr(self.mlp, "routed", False))
        if self.routed_mlp:  # the MLP's records carry its layer (per-layer thresholds use the index too)
            self.mlp.layer_index = index
        # a routed mixer (Mixture-of-Heads, DTRNet, adaptive span: class attribute `routed = True`) also takes
        # the forward pass's records as a 7th argument, for its decisions and aux losses
        self.routed_mixer = bool(getattr(self.mixer, "routed", False))
        if self.routed_mixer:
            self.mixer.layer_index = index

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
        share: KVShare | None = None, records: list[RouterRecord] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = self.mixer_norm(x)
        x = x + (self.mixer(n, cos, sin, kv, share, valid, records) if self.routed_mixer
                 else self.mixer(n, cos, sin, kv, share, valid))
        h = self.mlp_norm(x)
        return x + (self.mlp(h, records) if self.routed_mlp else self.mlp(h))


class HaipaiModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        mixer: Factory | None = None,
        mlp: Factory | None = None,
        router: Factory | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # the factories this model was built with: growth (io.arch.arch_of) rebuilds it larger
        self.factories = {"mixer": mixer, "mlp": mlp, "router": router}
        self.schedule = make_schedule(cfg)
        self.order = self.schedule.order()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # One module per *unique* layer; the schedule applies shared ones several times,
        # so their weights really are one storage.
        # Hybrid stacks: model.config.mixer_pattern assigns each *unique* layer a mixer
        # (A = the injected mixer or Attention, M = Mamba); shared layers keep theirs at every step.
        mixers = {"A": mixer or Attention, "M": Mamba}
        self.layers = nn.ModuleList(
            Block(cfg, mixers[cfg.mixer_letter(i)], mlp or SwiGLU, index=i) for i in range(self.schedule.n_unique)
        )
        self.router = (router or FullRecursion)(cfg)
        # Mixture-of-Depths gates for every mod_every-th unshared layer application (prelude/coda,
        # or every layer of a vanilla Nr=1 model), keyed by the application index.
        unshared = [a for a, (_, r) in enumerate(self.order) if r is None or cfg.n_recursions == 1]
        mod_apps = unshared[cfg.mod_every - 1 :: cfg.mod_every] if cfg.mod_capacity > 0 else []
        budget = getattr(self.router, "budget_head", None) is not None  # budget-aware MoD thresholds (model/budget.py)
        self.mod_gates = nn.ModuleDict({str(a): TopKGate(cfg.d_model, budget=budget) for a in mod_apps})
        self.mod_aux_loss_weight = 0.001
        # recompute the recursion steps' layer activations in the backward (set by the module's
        # activation_checkpointing argument; not part of the architecture)
        self.activation_checkpointing = False
        if cfg.kv_mode == "shared" and not self.schedule.cycle:
            raise ConfigError(f"model.config.kv_mode=shared needs a cycle strategy (got sharing={cfg.sharing})")
        if cfg.kv_mode == "shared" and not self.router.every_token_at_first_step():
            raise ConfigError(
                f"model.config.kv_mode=shared reuses step 1's keys/values of every token, so the first capacity must "
                f"be 1: every token runs the first recursion step (model.router {type(self.router).__name__})"
            )
        if not self.schedule.cycle and getattr(self.router, "needs_cycle", True):
            raise ConfigError(
                f"model.router {type(self.router).__name__} needs a cycle strategy; "
                f"set model.config.sharing to cycle or middle_cycle (got {cfg.sharing})"
            )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            # GPT-2 / nanoGPT: residual output projections scaled by depth, so the
            # residual stream's variance does not grow with the (effective) depth.
            s = std / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "is_residual_out", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    # ----------------------------------------------------------------- counts
    def num_parameters(self) -> dict[str, int]:
        """unique: stored parameters; effective: parameters a token meets with every recursion."""
        unique = sum(p.numel() for p in self.parameters())
        shared = sum(p.numel() for i in self.schedule.shared for p in self.layers[i].parameters())
        return {"unique": unique, "effective": unique + (self.schedule.n_recursions - 1) * shared}

    def new_cache(self, max_len: int | None = None) -> KVCache:
        # a KV-quantized model (quant/methods.py) sets kv_cache_factory: its caches store int8/int4
        make = getattr(self, "kv_cache_factory", None) or KVCache
        return make(len(self.order), max_len or self.cfg.max_seq_len)

    @classmethod
    def from_pretrained(cls, path: str) -> "HaipaiModel":
        """Load a `haipai export` directory (safetensors + config.json; no pickle, nothing executed).
        The same as `haipai_lightning.load_pretrained(path)[0]` (io/export.py): the front door resolves it,
        so the model does not import the export code (which imports the model)."""
        import haipai_lightning

        return haipai_lightning.load_pretrained(path)[0]

    # ---------------------------------------------------------------- forward
    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
        max_depth: int | None = None, budget: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(logits (B, T, V)).

        With a cache, the T new tokens follow `cache.seen`; each layer application caches the
        keys/values of the tokens that ran it (routing decides which), so decoding step by step
        gives the logits of the full forward. `max_depth` caps the recursion steps (a cheaper
        draft of the same model, for speculative decoding) or, above n_recursions, adds test-time
        recursion steps (MoR paper, arXiv 2507.10524, test-time scaling by depth): an extra step
        r >= Nr runs the last recursion step's layers again, routed by `router.step(r, ...)` (each
        router states how: model/routing/base.py), with its own cache slots after the coda's.
        `budget` (B,) or a number: the compute each sequence gets, in the router's budget unit (mean
        depth for expert-choice MoR, MoD capacity for MoD; model/budget.py); None = the router's budget
        head chooses (if it has one).
        """
        B, T = input_ids.shape
        if positions is None:
            start = cache.seen if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        records: list[RouterRecord] = []
        state: dict = {}  # per-forward routing state (previous selection, token depths)
        share_store: dict = {}  # recursive KV sharing: step-1 keys/values per shared layer slot
        h = self.embed(input_ids)  # (B, T, D)

        def apply(h: torch.Tensor, sel: Selection, lo: int, hi: int, step: int | None = None,
                  shift: int = 0) -> torch.Tensor:
            """Run layer applications lo..hi-1 on h (B, k, D), the tokens `sel` of the sequence.
            `shift`: a test-time extra step keeps its keys/values in cache slots a + shift."""
            pos = sel.positions(positions)  # original RoPE positions of the gathered tokens
            cos, sin = self.rope(pos)
            # routed tokens without a cache: attention needs their absolute positions (sliding window)
            share = KVShare.at(pos) if cache is None and not sel.is_full else None
            for a in range(lo, hi):
                layer = self.layers[self.order[a][0]]
                if step is not None and self.cfg.kv_mode == "shared":
                    share = KVShare(share_store, a - lo, step > 0, pos)
                kv = KVView(cache[a + shift], pos, valid=sel.valid) if cache is not None else None
                if str(a) in self.mod_gates:
                    h = self._mod(a, layer, h, pos, records, cache, state.get("budget_scale"), shift)
                elif self.activation_checkpointing and self.order[a][1] is not None and kv is None and torch.is_grad_enabled():
                    h = checkpointed_layer(layer, h, cos, sin, share, records, sel.valid)  # recursion blocks only
                else:
                    h = layer(h, cos, sin, kv, share, records, sel.valid if kv is None else None)
            return h

        n_pre = len(self.schedule.prelude)
        full = Selection.full(T)
        h = apply(h, full, 0, n_pre)
        if budget is not None or getattr(self.router, "budget_head", None) is not None:  # per-sequence compute (model/budget.py)
            scale = budget_scale(self.router, h, positions, cache, budget, self.training)
            state["budget_scale"] = scale
        if self.schedule.cycle:
            slices = self.schedule.step_slices()
            nr = len(slices)
            for r in range(nr if max_depth is None else max_depth):
                lo, hi = slices[min(r, nr - 1)]  # an extra step (r >= Nr) reruns the last step's layers
                shift = 0 if r < nr else len(self.order) + (r - nr) * (hi - lo) - lo
                if shift and cache is not None:
                    cache.ensure(hi + shift)
                h = self.router.step(r, h, lambda x, sel, lo=lo, hi=hi, r=r, s=shift: apply(x, sel, lo, hi, r, s),
                                     state, records)
            end = slices[-1][1]
        elif max_depth is not None and max_depth > self.schedule.n_recursions:
            raise ConfigError(f"max_depth={max_depth} needs a cycle sharing strategy (cycle or middle_cycle); "
                              f"sharing={self.cfg.sharing} runs each shared layer Nr times in a row")
        else:
            end = n_pre + len(self.schedule.shared) * self.schedule.n_recursions
            h = apply(h, full, n_pre, end)
        h = apply(h, full, end, len(self.order))
        if "budget_scale" in state:
            records.append(budget_record(self.router, state["budget_scale"], records))
        if cache is not None:
            cache.seen += T
        logits = self.head(self.norm(h))
        aux = {
            f"{rec.name}/{k}": rec.aux_weights.get(k, 1.0) * v for rec in records for k, v in rec.aux_losses.items()
        }
        return ModelOutput(logits=logits, aux_losses=aux, records=records)

    def _mod(self, a: int, layer: Block, h: torch.Tensor, positions: torch.Tensor, records: list,
             cache: KVCache | None = None, budget: torch.Tensor | None = None, shift: int = 0) -> torch.Tensor:
        """Mixture-of-Depths around one unshared layer: the top-capacity tokens run it, the rest skip.

        Output of a routed token: h + sigmoid(logit) * (layer(h) - h) (MoD, Raposo et al. 2024).
        Inference routes causally by the gate's 0.5 threshold, trained by the BCE aux loss.
        """
        B, T, _ = h.shape
        gate: TopKGate = self.mod_gates[str(a)]
        full = Selection.full(T)
        k: int | torch.Tensor = capacity_k(self.cfg.mod_capacity, T)
        if budget is not None and T == budget.size(1):  # per-sequence capacity min(1, s * mod_capacity)
            k = capacity_k_rows((self.cfg.mod_capacity * budget[:, -1]).clamp(max=1.0), T)
        else:
            budget = None  # the engine's one-token rows: the reference threshold
        sel, logits, aux, metrics = gate.decide(h, full, k, use_threshold=not self.training, scale=budget)
        x = sel.gather(h)
        if x.size(1):
            pos = sel.positions(positions)
            cos, sin = self.rope(pos)
            g = torch.sigmoid(sel.gather(logits[..., None]))
            kv = KVView(cache[a + shift], pos, valid=sel.valid) if cache is not None else None
            share = KVShare.at(pos) if kv is None else None  # the gathered tokens' positions (sliding window)
            x = x + g * (layer(x, cos, sin, kv, share, records, sel.valid if kv is None else None) - x)  # records: a routed MLP inside keeps its aux losses
        records.append(RouterRecord("mod", None, torch.sigmoid(logits.detach()), sel.mask(B, h.device),
                                    aux, {"bce": self.mod_aux_loss_weight}, metrics, application=a))
        return sel.scatter(h, x)

