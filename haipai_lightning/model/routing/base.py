"""The depth-router contract, and FullRecursion (every token runs every step).

A router is built by a factory `Callable[[ModelConfig], nn.Module]` (YAML `class_path`) and owns
its decisions; code outside it (the model, the decoding engine, FLOP counting, rotations, growth)
never asks its class. For each recursion step r of a full-sequence forward the model calls

    h = router.step(r, h, run, state, records)

where `run(x, sel)` applies the shared block to the gathered tokens `x` (B, k, D) of the
`Selection` sel, and `state` is a dict that lives for one forward pass. Every router appends a
`RouterRecord`. The decoding engine, which moves one token per sequence through the block at a
time, asks the router causally (`decode_start`, `decode_continues`, `decode_combine`).

Test-time depth: `HaipaiModel.forward(max_depth=M)` with M > Nr calls `step(r, ...)` for r >= Nr too
(the last step's layers again); each router routes those extra steps by its own rule: every token
(FullRecursion), the last step's gate and capacity among the still-active tokens (expert-choice),
the tokens that chose the deepest depth (token-choice).

Budgets (model/budget.py): a router with a `budget_head` reads `state["budget_scale"]` (B, T) and
says what a scale buys in its unit (`budget_compute`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.budget import BudgetHead
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.model.routing.selection import Selection

RunFn = Callable[[torch.Tensor, Selection], torch.Tensor]  # (x (B, k, D), sel) -> block(x) (B, k, D)


class Router(nn.Module):
    """Base class of depth routers: the contract, with the defaults of "every token runs every step"."""

    #: does the router need a cycle sharing strategy (a recursion step = one pass of the shared block)?
    needs_cycle: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_recursions = cfg.n_recursions
        self.budget_head: BudgetHead | None = None  # set when the router honours per-sequence budgets

    # ------------------------------------------------------------ full-sequence forward
    def step(self, r: int, h: torch.Tensor, run: RunFn, state: dict, records: list[RouterRecord]) -> torch.Tensor:
        """Run recursion step r on h (B, T, D); returns the new h."""
        return run(h, Selection.full(h.size(1)))

    def every_token_at_first_step(self) -> bool:
        """Does every token run step 0? (kv_mode=shared reuses step 0's keys/values of every token.)"""
        return True

    # ------------------------------------------------------- causal decoding, one token at a time
    def decode_start(self, h: torch.Tensor) -> torch.Tensor | None:
        """h (N, 1, D) after the prelude -> a per-token routing state (N, m) kept by the engine, or None."""
        return None

    def decode_continues(self, r: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """Does each token, its hidden state h (N, 1, D), run recursion step r (N,)? -> bool (N,)."""
        return r < self.n_recursions

    def decode_combine(self, r: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
                       state: torch.Tensor | None) -> torch.Tensor:
        """Residual combination of one block pass: h (N, 1, D) in, out = block(h) -> new h."""
        return out

    # ------------------------------------------------------------------------- budgets
    def budget_compute(self, scale: torch.Tensor) -> torch.Tensor:
        """What compute scale s (B,) buys, in this router's budget unit (B,)."""
        raise ConfigError(f"model.router {type(self).__name__} takes no compute budget; use ExpertChoiceRouter "
                          "(mean depth) or FullRecursion with Mixture-of-Depths (MoD capacity) with init_args.budget")

    def _budget_head(self, cfg: ModelConfig, budget: dict | None) -> nn.Module | None:
        """A BudgetHead from the `budget` init arg (a mapping of its arguments), or None."""
        if budget is None:
            return None
        if not isinstance(budget, dict):
            raise ConfigError(f"model.router.init_args.budget={budget!r} must be a mapping of BudgetHead arguments "
                              "(prefix_len, target, hidden, s_min, s_max, fit_weight, dual_rate) or null")
        try:
            return BudgetHead(cfg.d_model, **budget)
        except TypeError as e:
            raise ConfigError(f"model.router.init_args.budget: {e}; valid keys: prefix_len, target, hidden, s_min, "
                              "s_max, fit_weight, dual_rate") from e

    # ------------------------------------------------------------------ planning, weights
    def nominal_records(self, B: int, T: int) -> list[RouterRecord]:
        """Records of what the router is configured to do (FLOP planning without a forward)."""
        return []

    def stream_readers(self) -> list[nn.Linear]:
        """Linears that read the raw residual stream (rotations fuse Q into them). A router whose
        parameters are not all listed here must override this; the default says it has none."""
        if any(True for _ in self.parameters()):
            raise NotImplementedError(f"{type(self).__name__} has parameters: list the ones reading the residual "
                                      "stream in stream_readers()")
        return []

    @classmethod
    def widened_init_args(cls, init_args: dict[str, Any], factor: int) -> dict[str, Any]:
        """init_args of this router for a model widened `factor` times (HyperCloning)."""
        return dict(init_args)


class FullRecursion(Router):
    """Every token runs every recursion step: the recursive-Transformer baseline (no routing)."""

    needs_cycle = False

    def __init__(self, cfg: ModelConfig, budget: dict | None = None) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            budget: a budget head (model/budget.py) setting the Mixture-of-Depths capacity per sequence
                (needs model.config.mod_capacity > 0; the budget unit is the MoD capacity).
        """
        super().__init__(cfg)
        if budget is not None and cfg.mod_capacity <= 0:
            raise ConfigError("model.router.init_args.budget on FullRecursion sets the Mixture-of-Depths capacity: "
                              "set model.config.mod_capacity > 0 (or use ExpertChoiceRouter for a depth budget)")
        self.mod_capacity = cfg.mod_capacity
        self.budget_head = self._budget_head(cfg, budget)

    def budget_compute(self, scale: torch.Tensor) -> torch.Tensor:
        """The MoD capacity min(1, s * mod_capacity)."""
        if self.budget_head is None:
            return super().budget_compute(scale)
        return (self.mod_capacity * scale).clamp(max=1.0)

    def stream_readers(self) -> list[nn.Linear]:
        return [self.budget_head.net[0]] if self.budget_head is not None else []
