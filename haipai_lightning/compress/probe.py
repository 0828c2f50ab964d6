"""Look inside a forward pass: the attention of chosen layer applications, hidden states, early exit.

Forward (pre-)hooks on the unique layers see every application of a shared layer in execution
order, so a per-forward counter maps a call to its application index. A probe can stop the
forward after the applications it needs (`StopForward`): EHPC and REFORM score with the early
layers only, which is where their prefill saving comes from.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from haipai_lightning.compress.kv_ops import attention_scores
from haipai_lightning.model.rope import apply_rope


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the caller catches it)."""


def query_positions(x: torch.Tensor, share) -> torch.Tensor:
    """(B|1, T) absolute positions of a mixer's tokens: a routed computation's, else 0..T-1 offsets."""
    pos = share.q_pos if share is not None and getattr(share, "q_pos", None) is not None else None
    if pos is None:
        return torch.arange(x.size(1), device=x.device)[None]
    return pos if pos.dim() == 2 else pos[None]


def project_qk(mixer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixer's RoPE'd queries (B, H, T, hd) and keys (B, Hkv, T, hd) of its input x (B, T, D)."""
    B, T, _ = x.shape
    q = apply_rope(mixer.wq(x).view(B, T, mixer.n_heads, mixer.head_dim), cos, sin).transpose(1, 2)
    k = apply_rope(mixer.wk(x).view(B, T, mixer.n_kv_heads, mixer.head_dim), cos, sin).transpose(1, 2)
    return q, k


# fn(application, mixer, x (B, T, D) normed input, cos, sin, kv view or None, share or None)
MixerFn = Callable[[int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, object, object], None]
# fn(application, block output h (B, T, D))
BlockFn = Callable[[int, torch.Tensor], None]


@contextmanager
def hooks(model: torch.nn.Module, on_mixer: MixerFn | None = None, on_block: BlockFn | None = None) -> Iterator[dict]:
    """Call on_mixer before every attention mixer and on_block after every layer application.

    Yields the counter dict; reset `counter["mixer"] = counter["block"] = 0` before each forward."""
    counter = {"mixer": 0, "block": 0}
    handles = []

    def pre(mod, args):  # noqa: ANN001, ANN202
        a = counter["mixer"]
        counter["mixer"] += 1
        if on_mixer is not None and hasattr(mod, "wq"):
            x, cos, sin = args[0], args[1], args[2]
            on_mixer(a, mod, x, cos, sin, args[3] if len(args) > 3 else None, args[4] if len(args) > 4 else None)

    def post(mod, args, out):  # noqa: ANN001, ANN202
        a = counter["block"]
        counter["block"] += 1
        if on_block is not None:
            on_block(a, out)

    for layer in model.layers:
        handles.append(layer.mixer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def window_attention(model: torch.nn.Module, ids: torch.Tensor, n_apps: int, window: int) -> torch.Tensor:
    """Attention of the last `window` queries in the first n_apps applications: (n_apps, B, H, W, T).

    The forward stops after application n_apps - 1 (the rest of the model never runs)."""
    B, T = ids.shape
    W = min(window, T)
    H = model.cfg.n_heads
    out = torch.zeros(n_apps, B, H, W, T, device=ids.device)

    def on_mixer(a, mixer, x, cos, sin, kv, share):  # noqa: ANN001, ANN202
        if a >= n_apps:
            raise StopForward
        q, k = project_qk(mixer, x, cos, sin)
        pos = query_positions(x, share)  # (B|1, t)
        att = attention_scores(q[:, :, -W:], k, pos[:, -W:], pos)  # (B, H, W, t)
        idx = pos.expand(B, -1)[:, None, None, :].expand(-1, H, W, -1)
        out[a].scatter_(3, idx, att)

    def on_block(a, h):  # noqa: ANN001, ANN202
        if a + 1 >= n_apps:
            raise StopForward

    was = model.training
    model.eval()
    with hooks(model, on_mixer, on_block):
        try:
            model(ids)
        except StopForward:
            pass
    model.train(was)
    return out
