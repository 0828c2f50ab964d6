"""The depth-router contract, and FullRecursion (every token runs every step).

A router is built by a factory `Callable[[ModelConfig], nn.Module]` (YAML `class_path`) and owns
its decisions; code outside it (the model, the decoding engine, FLOP counting, rotations, growth)
never asks its class. For each recursion step r of a full-sequence forward the model calls

    h = router.step(r, h, run, state, records)

where `run(x, sel)` applies the shared block to the gathered tokens `x` (B, k, D) of the
`Selection` sel, and `state` is a dict that lives for one forward pass. Every router appends a
`RouterRecord`. The decoding engine, which moves one token per sequence through the block at a
time, asks the router causally (`decode_start`, `decode_continues`, `decode_combine`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from haipai_lightning.config import ModelConfig
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

    def __init__(self, cfg: ModelConfig) -> None:
        """Args:
            cfg: the model configuration (given by the model).
        """
        super().__init__(cfg)
