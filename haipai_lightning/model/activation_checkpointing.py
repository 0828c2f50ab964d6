"""Activation checkpointing of the recursion blocks: keep a layer's input, recompute its inside.

A recursion step runs the shared block Nr times, so its activations are what grows with Nr.
`checkpointed_layer` runs one layer application under `torch.utils.checkpoint` (non-reentrant):
the forward keeps only the input; the backward recomputes the layer. Gradients are the same
as without checkpointing (tested to float precision), at the price of ~one more forward.

Two things must not happen twice:
- routing records: a routed MLP (MoE / MoT) appends its record in the forward; the
  recomputation runs with a throw-away list, so a step's records appear once;
- routing decisions: a token-choice MoE with loss-free balancing moves its bias in the
  forward, so recomputing it would route differently. For a layer with a routed MLP only
  the mixer (attention / Mamba) is checkpointed; the MLP runs normally.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed_layer(layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, share: Any,
                       records: list, valid: torch.Tensor | None = None) -> torch.Tensor:
    """layer(h, cos, sin, None, share, records, valid) with its activations recomputed in the backward.

    h (B, k, D) -> (B, k, D); `layer` is a model.Block; no KV cache (training forwards only).
    """
    if layer.routed_mlp:
        mixer_calls = [0]

        def mixer(x: torch.Tensor) -> torch.Tensor:
            n = layer.mixer_norm(x)
            if not getattr(layer, "routed_mixer", False):
                return layer.mixer(n, cos, sin, None, share, valid)
            mixer_calls[0] += 1  # the recomputation in the backward must not record twice
            return layer.mixer(n, cos, sin, None, share, valid, records if mixer_calls[0] == 1 else [])

        x = h + checkpoint(mixer, h, use_reentrant=False)
        return x + layer.mlp(layer.mlp_norm(x), records)

    calls = [0]

    def run(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return layer(x, cos, sin, None, share, records if calls[0] == 1 else [], valid)

    return checkpoint(run, h, use_reentrant=False)
