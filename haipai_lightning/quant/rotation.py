"""Rotations fused into the weights (QuaRot / SpinQuant), exact in fp32.

The residual stream h (B, T, D) is rotated to h Q (Q orthogonal, a randomised Hadamard): every
weight that writes into the stream gets Q^T on its output side, every weight that reads it gets
Q on its input side, so the network computes the same function while the activations that the
linears see have their outlier channels spread over all D channels (what 4-bit activations need).

RMSNorm is rotation-invariant only without its gain: RMS(h Q) = RMS(h), but (h Q) * g != (h * g) Q.
So the gains are first fused into the linears that follow the norm (W <- W diag(g); the norm keeps
a gain of ones) -- `fuse_norm_gains` -- and only then is Q applied. The final norm's gain goes into
the head, so a tied head and embedding stop being equal (head = E diag(g) Q, embedding = E Q):
rotation unties them (config.tie_embeddings becomes False).

Optionally (`heads=True`) the values and the attention output are rotated per head by an
orthogonal Hadamard R (hd, hd): v_h -> v_h R (rows of wv), wo's input columns of head h -> R too.
One R for all heads, so grouped-query attention (a kv head serving several query heads) and MoR's
recursive KV sharing are unaffected. This flattens the value cache and wo's input (SpinQuant R2).

Covered: attention (MHA / GQA / MQA), SwiGLU, Mamba (in_proj reads, out_proj writes), MoR shared
blocks (one module, rotated once, applied Nr times), expert-choice / token-choice routers and MoD
gates (they read the raw stream: W <- W Q). Refused with a clear error: MoE / MoT MLPs and
components this file does not know.
"""

from __future__ import annotations

import torch
from torch import nn

from haipai_lightning.config import ConfigError
from haipai_lightning.quant.hadamard import random_orthogonal


def _io(module: nn.Module, what: str) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(linears reading the normed stream, linears writing the stream) of a mixer / MLP."""
    io = getattr(module, "stream_io", None)  # the component's contract: which linears read / write the stream
    if io is not None:
        return io()
    kind = "routed MLPs (MoE / Mixture-of-Tokens expert stacks)" if getattr(module, "routed", False) else \
        f"{type(module).__name__}"
    raise ConfigError(
        f"rotation/quantization does not support {what} {type(module).__name__}: {kind} are not handled; "
        "use a model with Attention/Mamba mixers and SwiGLU MLPs, or a method without rotation "
        "(e.g. --method int8)"
    )


def _router_readers(model: nn.Module) -> list[nn.Linear]:
    """Router linears that read the raw residual stream."""
    r = model.router
    try:
        out = list(r.stream_readers())  # the router's contract (routing/base.py)
    except (AttributeError, NotImplementedError) as e:
        raise ConfigError(f"rotation does not know how router {type(r).__name__} reads the residual stream: "
                          "it must list those linears in stream_readers() (haipai_lightning.Router)") from e
    for g in model.mod_gates.values():
        out += g.stream_readers()
    return out


def check_supported(model: nn.Module) -> None:
    """Raise ConfigError if the model has a component the rotation cannot handle."""
    for layer in model.layers:
        _io(layer.mixer, "mixer")
        _io(layer.mlp, "MLP")
    _router_readers(model)


def untie(model: nn.Module) -> None:
    """Give the head its own copy of the embedding matrix (config.tie_embeddings -> False)."""
    if model.head.weight is model.embed.weight:
        model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    model.cfg.tie_embeddings = False


@torch.no_grad()
def fuse_norm_gains(model: nn.Module) -> None:
    """W <- W diag(g) for every linear after an RMSNorm with gain g; the gain becomes ones. Exact."""
    check_supported(model)
    pairs = []
    for layer in model.layers:
        pairs.append((layer.mixer_norm, _io(layer.mixer, "mixer")[0]))
        pairs.append((layer.mlp_norm, _io(layer.mlp, "MLP")[0]))
    if model.norm.weight is not None and not bool((model.norm.weight == 1).all()):
        untie(model)  # the head changes, the embedding does not
    pairs.append((model.norm, [model.head]))
    for norm, readers in pairs:
        if norm.weight is None:
            continue
        g = norm.weight.detach().double()
        for lin in readers:
            lin.weight.copy_((lin.weight.double() * g[None]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, heads: bool = True) -> torch.Tensor:
    """Fuse the norm gains, then rotate the residual stream by a seeded randomised Hadamard Q (D, D)
    (and, with `heads`, values / attention outputs per head). Returns Q. The function is unchanged."""
    fuse_norm_gains(model)
    untie(model)  # E Q for the embedding, E diag(g) Q for the head: two matrices
    Q = random_orthogonal(model.cfg.d_model, seed)  # float64 (D, D)
    R = random_orthogonal(model.cfg.head_dim, seed + 1) if heads else None  # (hd, hd)
    fuse_rotation(model, Q, R)
    return Q


@torch.no_grad()
def fuse_rotation(model: nn.Module, Q: torch.Tensor, R: torch.Tensor | None = None) -> None:
    """Fuse a residual-stream rotation Q (D, D) (and a per-head value rotation R (hd, hd)) into a model
    whose norm gains are fused. Exact in fp32: the function is unchanged. Used with random Hadamards
    (rotate_model) and with learned rotations (spinquant.py)."""
    untie(model)
    Q = Q.double()

    def read(lin: nn.Linear) -> None:  # y = x W^T, x -> x Q  =>  W <- W Q
        lin.weight.copy_((lin.weight.double() @ Q).to(lin.weight.dtype))

    def write(lin: nn.Linear) -> None:  # y -> y Q  =>  W <- Q^T W
        lin.weight.copy_((Q.T @ lin.weight.double()).to(lin.weight.dtype))

    model.embed.weight.copy_((model.embed.weight.double() @ Q).to(model.embed.weight.dtype))
    for layer in model.layers:
        for part, what in ((layer.mixer, "mixer"), (layer.mlp, "MLP")):
            readers, writers = _io(part, what)
            for lin in readers:
                read(lin)
            for lin in writers:
                write(lin)
    for lin in _router_readers(model):
        read(lin)
    read(model.head)
    if R is not None:
        for layer in model.layers:
            if layer.mixer.cache_kind == "kv":  # attention: rotate values and wo's inputs per head
                rotate_values(layer.mixer, R.double())


@torch.no_grad()
def rotate_values(attn: nn.Module, R: torch.Tensor) -> None:
    """v_h -> v_h R for every kv head (rows of wv), and wo's input columns of every head -> R."""
    hd = attn.head_dim
    wv = attn.wv.weight.double().view(attn.n_kv_heads, hd, -1)  # (Hkv, hd, D): v_h = x wv_h^T
    attn.wv.weight.copy_(torch.einsum("ji,hjd->hid", R, wv).reshape_as(attn.wv.weight).float())  # R^T wv_h
    wo = attn.wo.weight.double().view(-1, attn.n_heads, hd)  # (D, H, hd): out = sum_h o_h wo_h^T
    attn.wo.weight.copy_(torch.einsum("dhj,ji->dhi", wo, R).reshape_as(attn.wo.weight).float())  # wo_h R
