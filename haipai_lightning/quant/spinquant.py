"""SpinQuant: learned rotations (Liu et al., arXiv 2405.16406), fused into the weights like rotation.py.

QuaRot rotates the residual stream by a random Hadamard Q (rotation.py). SpinQuant (section 3)
observes that random rotations differ a lot in quantized accuracy and *learns* them: R1 (D, D)
on the residual stream and R2 (hd, hd) per head on the values / attention output, minimising the
loss of the fake-quantized network (W4A4 / W4A4KV4) on calibration batches while the fp32 network
is unchanged for any orthogonal R1, R2. The rotations stay on the orthogonal manifold by Cayley
SGD (section 3.2, after Li et al. 2020, arXiv 2002.01113): with G = dL/dR and the skew matrix
Y = G R^T - R G^T, R <- (I + a/2 Y)^-1 (I - a/2 Y) R, a Cayley transform: orthogonal in exact
arithmetic (float64 here: |R R^T - I| stays ~1e-14). Initialised at rotation.py's randomised
Hadamard (seed) as the paper's best initialisation; the learning rate decays linearly to zero and
the rotation with the lowest calibration loss seen is returned, so the learned rotation is never
worse than its Hadamard start on the calibration batches.

The quantized forward used for learning (all fake quantization with straight-through gradients):
every block linear's weight rotated (W Q for stream readers, Q^T W for writers, values R^T /
wo's head columns R) and round-to-nearest quantized in the stored layout; activations per-token
at `act_bits` before every block linear (and the down projection's online Hadamard, as QLinear
runs it); keys and values (the wk / wv outputs, per head and token) at `kv_bits`; the embedding
and head rotated and quantized. The real KV cache quantizes keys after RoPE and behind its own
Hadamard (kv_cache.py): the learning loss approximates that by quantizing keys before RoPE.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.quant.hadamard import hadamard, has_hadamard, random_orthogonal
from haipai_lightning.quant.rotation import _io, _router_readers, fuse_rotation, untie
from haipai_lightning.model.mlps.dense import SwiGLU


def fq_weight(w: torch.Tensor, bits: int | None, group_size: int) -> torch.Tensor:
    """Round-to-nearest fake quantization of w (N, K) in the stored layout, straight-through gradient."""
    if bits is None:
        return w
    N, K = w.shape
    if bits == 8:
        s = w.detach().abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        q = torch.round(w / s).clamp(-127, 127) * s
    else:
        g = group_size if K % group_size == 0 else K
        wg = w.view(N, K // g, g)
        lo = wg.detach().amin(-1, keepdim=True).clamp(max=0)
        hi = wg.detach().amax(-1, keepdim=True).clamp(min=0)
        maxq = 2**bits - 1
        s = ((hi - lo) / maxq).clamp(min=1e-12)
        q = (torch.round((wg - lo) / s).clamp(0, maxq) * s + lo).view(N, K)
    return w + (q - w).detach()


def fq_tokens(x: torch.Tensor, bits: int | None, dim_group: int | None = None) -> torch.Tensor:
    """Symmetric per-token (per `dim_group` channels) fake quantization, straight-through."""
    if bits is None:
        return x
    shape = x.shape
    xg = x if dim_group is None else x.reshape(*shape[:-1], shape[-1] // dim_group, dim_group)
    qmax = 2 ** (bits - 1) - 1
    s = xg.detach().abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
    q = (torch.round(xg / s).clamp(-qmax - 1, qmax) * s).reshape(shape)
    return x + (q - x).detach()


class _Rotations(nn.Module):
    def __init__(self, Q: torch.Tensor, R: torch.Tensor | None) -> None:
        super().__init__()
        self.Q, self.R = Q, R


class _RotLinear(nn.Module):
    """A linear whose weight is built from the frozen W0 and the current rotations on every call."""

    def __init__(self, w0: torch.Tensor, rot: _Rotations, read: bool, write: bool, head_out: int = 0,
                 head_in: int = 0, w_bits: int | None = None, a_bits: int | None = None, group_size: int = 32,
                 online: bool = False, kv_bits: int | None = None, hd: int = 0) -> None:
        super().__init__()
        self.w0, self.rot = w0, [rot]  # a list: the shared holder is not a submodule
        self.read, self.write, self.head_out, self.head_in = read, write, head_out, head_in
        self.w_bits, self.a_bits, self.group_size, self.kv_bits, self.hd = w_bits, a_bits, group_size, kv_bits, hd
        self.hm = (hadamard(w0.size(1)) / math.sqrt(w0.size(1))).float() if online else None

    def weight_now(self) -> torch.Tensor:
        Q, R = self.rot[0].Q, self.rot[0].R
        w = self.w0
        if self.read:
            w = w @ Q
        if self.write:
            w = Q.T @ w
        if self.head_out and R is not None:  # v_h -> v_h R: rows of each head block -> R^T w_h
            hd = R.size(0)
            w = torch.einsum("ji,hjd->hid", R, w.view(self.head_out, hd, -1)).reshape(w.shape)
        if self.head_in and R is not None:  # wo's input columns of each head -> w_h R
            hd = R.size(0)
            w = torch.einsum("dhj,ji->dhi", w.view(w.size(0), self.head_in, hd), R).reshape(w.shape)
        if self.hm is not None:
            w = w @ self.hm
        return fq_weight(w, self.w_bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hm is not None:
            x = x @ self.hm
        y = F.linear(fq_tokens(x, self.a_bits), self.weight_now())
        return fq_tokens(y, self.kv_bits, self.hd) if self.kv_bits else y


class _RotEmbedding(nn.Module):
    def __init__(self, e0: torch.Tensor, rot: _Rotations, bits: int | None, group_size: int) -> None:
        super().__init__()
        self.e0, self.rot, self.bits, self.group_size = e0, [rot], bits, group_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fq_weight(self.e0 @ self.rot[0].Q, self.bits, self.group_size))


def _fake_quant_copy(model: nn.Module, rot: _Rotations, w_bits, a_bits, kv_bits, group_size) -> nn.Module:
    """A copy of `model` (norm gains already fused) computing the rotated, fake-quantized network."""
    work = copy.deepcopy(model)
    untie(work)
    for p in work.parameters():
        p.requires_grad_(False)
    where = {id(child): (parent, name) for parent in work.modules() for name, child in parent.named_children()}
    done: set[int] = set()

    def swap(lin: nn.Module, **kw) -> None:
        if id(lin) in done:
            return
        parent, name = where[id(lin)]
        setattr(parent, name, _RotLinear(lin.weight.detach().float(), rot, group_size=group_size, **kw))
        done.add(id(lin))

    for layer in work.layers:
        attn = layer.mixer if getattr(layer.mixer, "cache_kind", None) == "kv" else None
        for part, what in ((layer.mixer, "mixer"), (layer.mlp, "MLP")):
            readers, writers = _io(part, what)
            for lin in readers:
                kv = kv_bits if attn is not None and lin in (attn.wk, attn.wv) else None
                swap(lin, read=True, write=False, head_out=attn.n_kv_heads if attn is not None and lin is attn.wv else 0,
                     w_bits=w_bits, a_bits=a_bits, kv_bits=kv, hd=attn.head_dim if attn is not None else 0)
            for lin in writers:
                online = (a_bits is not None and isinstance(part, SwiGLU) and lin is part.w2
                          and has_hadamard(lin.in_features))
                swap(lin, read=False, write=True, head_in=attn.n_heads if attn is not None and lin is attn.wo else 0,
                     w_bits=w_bits, a_bits=a_bits, online=online)
            for parent in part.modules():  # other linears inside (e.g. Mamba's): quantized, not rotated
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear and id(child) not in done:
                        swap(child, read=False, write=False, w_bits=w_bits, a_bits=a_bits)
    for lin in _router_readers(work):
        swap(lin, read=True, write=False)  # routers and MoD gates stay fp32
    swap(work.head, read=True, write=False, w_bits=w_bits)
    work.embed = _RotEmbedding(work.embed.weight.detach().float(), rot, w_bits, group_size)
    return work.eval()


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal manifold (float64): (I + a/2 Y)^-1 (I - a/2 Y) R, Y = G R^T - R G^T."""
    Y = G @ R.T - R @ G.T
    eye = torch.eye(R.size(0), dtype=R.dtype)
    return torch.linalg.solve(eye + 0.5 * lr * Y, (eye - 0.5 * lr * Y) @ R)


def learn_rotation(model: nn.Module, batches: list[dict], w_bits: int | None, a_bits: int | None, kv_bits: int | None,
                   group_size: int = 32, seed: int = 0, steps: int = 24, lr: float = 1.5, heads: bool = True,
                   log: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Learn (R1 (D, D), R2 (hd, hd)) float64 for a model whose norm gains are fused; the model is not modified.
    `log`, when given, receives the calibration loss of every step (step 0 = the Hadamard start)."""
    D, hd = model.cfg.d_model, model.cfg.head_dim
    Q = random_orthogonal(D, seed)  # rotation.py's start: the same seeds as rotate_model
    R = random_orthogonal(hd, seed + 1) if heads else None
    rot = _Rotations(Q.float(), None if R is None else R.float())
    work = _fake_quant_copy(model, rot, w_bits, a_bits, kv_bits, group_size)
    best = (float("inf"), Q, R)
    for step in range(steps + 1):
        b = batches[step % len(batches)]
        rot.Q = Q.float().requires_grad_(True)
        rot.R = None if R is None else R.float().requires_grad_(True)
        with torch.enable_grad():
            logits = work(b["input_ids"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten(), ignore_index=-100)
            loss.backward()
        val = float(loss.detach())
        if log is not None:
            log.append(val)
        if val < best[0] and math.isfinite(val):
            best = (val, Q, R)
        if step == steps:
            break
        a = lr * (1 - step / steps)  # linear decay
        Q = cayley_step(Q, rot.Q.grad.double(), a)
        if R is not None and rot.R.grad is not None:
            R = cayley_step(R, rot.R.grad.double(), a)
    return best[1], best[2]


@torch.no_grad()
def apply_rotation(model: nn.Module, Q: torch.Tensor, R: torch.Tensor | None) -> None:
    """Fuse R1 = Q (and R2 = R per head) into a model whose norm gains are fused: rotation.rotate_model's
    weight algebra with given rotations. The fp32 function is unchanged."""
    fuse_rotation(model, Q, R)
