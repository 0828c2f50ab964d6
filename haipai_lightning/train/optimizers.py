"""Memory-lean optimizers for YAML (`model.optimizer: {class_path: haipai_lightning.GaLoreAdamW}, ...; every class here is exported by the package`).

    GaLoreAdamW   galore-torch's GaLoreAdamW (Zhao et al. 2024): the gradients of the
                  attention / MLP weight matrices are projected onto a rank-r subspace
                  (refreshed every `update_proj_gap` steps by an SVD), so Adam's two moments
                  are (r, n) instead of (m, n).
    QGaLoreAdamW  Q-GaLore-style (Zhang et al. 2024): GaLore whose projection matrices are
                  stored in INT8 or INT4 (group-wise absmax), refreshed lazily: a layer whose
                  subspace stops moving (cosine similarity of consecutive projections above
                  `cos_threshold` `queue_size` times in a row) doubles its update gap.
                  Built on galore-torch's projector (its SVD); runs on CPU and GPU.
    AdamW8bit     bitsandbytes' 8-bit AdamW, probed on the parameters' device at start.

All of them take the module's parameter groups (`haipai_lightning.optim.param_groups`):
the low-rank ones project the group named "matrix" (`target_groups`), i.e. the Linear
weights of every block's mixer and MLP, the shared recursion block's once. Everything
they keep is tensors and numbers, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch.optim import Optimizer

from haipai_lightning.config import ConfigError
from haipai_lightning.quant.codec import absmax_dequantize, absmax_quantize, pack_int4, unpack_int4


def _galore():
    try:
        import galore_torch
        from galore_torch.galore_projector import GaLoreProjector
    except Exception as e:  # ImportError, or transformers missing
        raise ConfigError(
            f"model.optimizer needs galore-torch ({type(e).__name__}: {e}); `pip install galore-torch` "
            "or use class_path: torch.optim.AdamW"
        ) from e
    return galore_torch, GaLoreProjector


def _check_rank(rank: int, update_proj_gap: int) -> None:
    if rank < 1:
        raise ConfigError(f"model.optimizer.init_args.rank={rank} must be >= 1 (e.g. 1/4 of d_model)")
    if update_proj_gap < 1:
        raise ConfigError(f"model.optimizer.init_args.update_proj_gap={update_proj_gap} must be >= 1 (e.g. 200)")


def _mark_groups(params: Any, target_groups: Sequence[str], extra: dict[str, Any]) -> list[dict]:
    """Add the GaLore keys to the targeted groups; plain tensors: every 2-D one is targeted."""
    params = list(params)
    if params and isinstance(params[0], torch.Tensor):
        mats = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        groups = [{"params": mats, "name": "matrix", **extra}] + ([{"params": rest, "name": "rest"}] if rest else [])
        return groups
    groups = [dict(g) for g in params]
    names = [g.get("name") for g in groups]
    if not any(n in target_groups for n in names):
        raise ConfigError(
            f"model.optimizer.init_args.target_groups={list(target_groups)} matches none of the parameter groups "
            f"{names}; use the group names of haipai_lightning.optim.param_groups (e.g. ['matrix'])"
        )
    for g in groups:
        if g.get("name") in target_groups:
            if any(p.ndim != 2 for p in g["params"]):
                raise ConfigError(f"parameter group {g['name']!r} holds non-matrix parameters; GaLore projects 2-D weights only")
            g.update(extra)
    return groups


# --------------------------------------------------------------------------- GaLore
class GaLoreAdamW(Optimizer):
    """galore-torch's GaLoreAdamW with GaLore groups built from Haipai's parameter groups.

    An instance *is* a `galore_torch.GaLoreAdamW` (the class is made at first use, so the
    package is only imported by those who ask for it); its state dict stores each
    projector as its orthogonal matrix (a tensor), not as a pickled object.
    """

    def __new__(cls, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                scale: float = 0.25, proj_type: str = "std", target_groups: Sequence[str] = ("matrix",)):
        _check_rank(rank, update_proj_gap)
        groups = _mark_groups(params, target_groups, {"rank": rank, "update_proj_gap": update_proj_gap,
                                                      "scale": scale, "proj_type": proj_type})
        return _galore_class()(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                               no_deprecation_warning=True)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", target_groups: Sequence[str] = ("matrix",)) -> None:
        """Args:
            params: parameter groups (given by the module).
            lr: learning rate.
            betas: Adam's moment decay rates.
            eps: Adam's epsilon.
            weight_decay: decoupled weight decay (groups may override; no_decay has 0).
            rank: rank r of the projected gradients (the GaLore paper: 128 for 60M, 256 for 350M models).
            update_proj_gap: steps between SVD refreshes of each projection.
            scale: factor on the projected-back update (GaLore's alpha, 0.25 in the paper).
            proj_type: galore-torch projection side: std, reverse_std, left, right, full.
            target_groups: parameter groups to project (param_groups names the Linear weights of
                mixers and MLPs "matrix").
        """  # never runs: __new__ returns the galore-torch optimizer; the signature is for the CLI


_GALORE_CLS: type | None = None


def _galore_class() -> type:
    global _GALORE_CLS
    if _GALORE_CLS is None:
        galore_torch, projector_cls = _galore()

        class _SerializableGaLoreAdamW(galore_torch.GaLoreAdamW):
            def state_dict(self) -> dict[str, Any]:
                sd = super().state_dict()
                sd["state"] = {k: _pack_projector(v) for k, v in sd["state"].items()}
                return sd

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                super().load_state_dict(state_dict)
                for group in self.param_groups:
                    for p in group["params"]:
                        st = self.state.get(p, {})
                        if "projector_ortho" in st:
                            proj = projector_cls(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                 scale=group["scale"], proj_type=group["proj_type"])
                            ortho = st.pop("projector_ortho")
                            proj.ortho_matrix = list(ortho.unbind(0)) if group["proj_type"] == "full" else ortho
                            st["projector"] = proj

        _SerializableGaLoreAdamW.__name__ = _SerializableGaLoreAdamW.__qualname__ = "GaLoreAdamW"
        _GALORE_CLS = _SerializableGaLoreAdamW
    return _GALORE_CLS


def _pack_projector(st: dict[str, Any]) -> dict[str, Any]:
    if "projector" not in st:
        return st
    st = dict(st)  # Optimizer.state_dict shares the live per-parameter dicts
    ortho = st.pop("projector").ortho_matrix
    if ortho is not None:
        st["projector_ortho"] = torch.stack(ortho) if isinstance(ortho, list) else ortho
    return st


# --------------------------------------------------------------------- quantization
def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise absmax quantization of x -> (codes uint8/int8, scales fp16 (n_groups,)).

    bits=8: one int8 per value in [-127, 127]; bits=4: values in [-7, 7], two per uint8.
    """
    flat = x.detach().float().flatten()
    pad = (-flat.numel()) % group_size
    g = torch.nn.functional.pad(flat, (0, pad)).view(-1, group_size)  # (n_groups, group_size)
    q, scale = absmax_quantize(g, bits, dim=1)
    q = q.flatten()
    return (q if bits == 8 else pack_int4(q)), scale[:, 0].half()


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, shape: torch.Size) -> torch.Tensor:
    n = math.prod(shape)
    n_pad = scale.numel() * group_size
    v = q if bits == 8 else unpack_int4(q, n_pad)
    v = absmax_dequantize(v[:n_pad].view(-1, group_size), scale[:, None])
    return v.flatten()[:n].view(shape)


# ------------------------------------------------------------------------- Q-GaLore
class QGaLoreAdamW(Optimizer):
    """AdamW with GaLore projection whose projection matrices live in INT8 / INT4.

    Per projected (m, n) weight: the projection (r, n) if m >= n (gradient G -> G P^T) else
    (m, r) (G -> P^T G) is kept only as `proj_bits` codes + fp16 scales per `quant_group`
    values and dequantized for each step; Adam's moments are the projected (m, r) / (r, n)
    fp32 tensors. At every refresh the new projection's cosine similarity with the old one
    (mean |cos| of corresponding basis vectors) is measured: `queue_size` refreshes in a row
    above `cos_threshold` double that layer's gap (Q-GaLore's lazy layer-wise subspace update).
    Other parameters get plain AdamW.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_bits: int = 4, quant_group: int = 256, cos_threshold: float = 0.4,
                 queue_size: int = 5, target_groups: Sequence[str] = ("matrix",)) -> None:
        """Args:
            params: parameter groups (given by the module).
            lr: learning rate.
            betas: Adam's moment decay rates.
            eps: Adam's epsilon.
            weight_decay: decoupled weight decay (groups may override; no_decay has 0).
            rank: rank r of the projected gradients.
            update_proj_gap: initial steps between SVD refreshes (doubled per layer when its subspace is stable).
            scale: factor on the projected-back update (GaLore's alpha).
            proj_bits: storage of the projection matrices: 8 (INT8) or 4 (INT4, two per byte).
            quant_group: values sharing one fp16 absmax scale.
            cos_threshold: similarity above which a refresh counts as "subspace unchanged".
            queue_size: unchanged refreshes in a row before the layer's gap doubles (0 = never).
            target_groups: parameter groups to project ("matrix": mixer / MLP Linear weights).
        """
        _check_rank(rank, update_proj_gap)
        if proj_bits not in (4, 8):
            raise ConfigError(f"model.optimizer.init_args.proj_bits={proj_bits}: use 8 (INT8) or 4 (INT4)")
        if quant_group < 2 or quant_group % 2:
            raise ConfigError(f"model.optimizer.init_args.quant_group={quant_group} must be an even number >= 2")
        groups = _mark_groups(params, target_groups, {"rank": rank})
        _galore()  # the SVD comes from galore-torch's projector: fail now, not at step 1
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, update_proj_gap=update_proj_gap,
                        scale=scale, proj_bits=proj_bits, quant_group=quant_group, cos_threshold=cos_threshold,
                        queue_size=queue_size)
        super().__init__(groups, defaults)

    def _new_projection(self, grad: torch.Tensor, group: dict, st: dict) -> None:
        """SVD of the gradient (galore-torch's projector), quantized into the state; lazy gap update."""
        _, projector_cls = _galore()
        right = grad.shape[0] >= grad.shape[1]
        proj = projector_cls(group["rank"]).get_orthogonal_matrix(grad, group["rank"], "right" if right else "left")
        old = self._projection(st, grad) if "proj_q" in st else None
        st["proj_q"], st["proj_scale"] = quantize(proj, group["proj_bits"], group["quant_group"])
        st["proj_shape"] = list(proj.shape)
        if old is not None and group["queue_size"] > 0:
            new = self._projection(st, grad)
            dim = 1 if right else 0  # basis vectors: rows of (r, n), columns of (m, r)
            cos = torch.nn.functional.cosine_similarity(old, new, dim=dim).abs().mean()
            st["stable"] = st["stable"] + 1 if float(cos) > group["cos_threshold"] else 0
            if st["stable"] >= group["queue_size"]:
                st["gap"], st["stable"] = st["gap"] * 2, 0
        st["next_refresh"] = st["step"] + st["gap"]

    @staticmethod
    def _projection(st: dict, like: torch.Tensor) -> torch.Tensor:
        g = st["proj_group"]
        return dequantize(st["proj_q"], st["proj_scale"], st["proj_bits"], g, torch.Size(st["proj_shape"])).to(like.dtype)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # torch casts every state tensor to its parameter's dtype on load; under bf16 parameters the fp16
        # scales would lose bits, so they travel as nested lists of floats (fp16 -> float is exact).
        # The inner dicts are the live state's: copy before replacing.
        sd["state"] = {k: ({**st, "proj_scale": st["proj_scale"].float().tolist()} if "proj_scale" in st else st)
                       for k, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # undo torch's cast of the codes (integers up to 255: exact in any float dtype torch casts to)
        for st in self.state.values():
            if "proj_q" in st:
                dev = st["proj_q"].device
                st["proj_q"] = st["proj_q"].to(torch.uint8 if st["proj_bits"] == 4 else torch.int8)
                scale = st["proj_scale"]
                st["proj_scale"] = (torch.tensor(scale, dtype=torch.float16, device=dev) if isinstance(scale, list)
                                    else scale.half())  # a tensor: a state saved before scales became lists

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state[p]
                lowrank = "rank" in group
                if not st:
                    st["step"] = 0
                    if lowrank:
                        st.update(gap=group["update_proj_gap"], stable=0, next_refresh=0,
                                  proj_bits=group["proj_bits"], proj_group=group["quant_group"])
                if lowrank:
                    if st["step"] >= st["next_refresh"]:
                        self._new_projection(grad.float(), group, st)
                    P = self._projection(st, grad)
                    right = grad.shape[0] >= grad.shape[1]
                    grad = grad @ P.t() if right else P.t() @ grad  # (m, r) or (r, n)
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                st["step"] += 1
                t = st["step"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                update = m / v.sqrt().add_(group["eps"])
                if lowrank:
                    update = (update @ P if right else P @ update) * group["scale"]  # back to (m, n)
                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-step_size)
        return loss


# ------------------------------------------------------------------------ 8-bit Adam
class AdamW8bit(Optimizer):
    """bitsandbytes' `AdamW8bit` (block-wise 8-bit moments), checked before training starts.

    The check runs one step of the 8-bit optimizer on a small tensor on the parameters'
    device: bitsandbytes that imports but has no kernel for the device (an old build, a
    platform without its native library) fails here with a ConfigError, not mid-run.
    """

    def __new__(cls, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096):
        params = list(params)
        first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
        bnb = check_bitsandbytes(first.device)
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                   min_8bit_size=min_8bit_size)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:
        """Args:
            params: parameter groups (given by the module).
            lr: learning rate.
            betas: Adam's moment decay rates.
            eps: Adam's epsilon.
            weight_decay: decoupled weight decay (groups may override; no_decay has 0).
            min_8bit_size: tensors with fewer elements keep 32-bit moments (bitsandbytes' default 4096).
        """  # never runs: __new__ returns the bitsandbytes optimizer; the signature is for the CLI


def check_bitsandbytes(device: torch.device | str = "cpu"):
    """Import bitsandbytes and run one 8-bit AdamW step on `device`; ConfigError where it cannot."""
    try:
        import bitsandbytes as bnb

        w = torch.nn.Parameter(torch.ones(64, 64, device=device))  # 4096 values: the 8-bit path
        w.grad = torch.full_like(w, 0.1)
        opt = bnb.optim.AdamW8bit([w], lr=0.1)
        opt.step()
        if not torch.isfinite(w).all() or opt.state[w]["state1"].dtype != torch.uint8:
            raise RuntimeError("the probe step did not produce 8-bit state")
    except Exception as e:
        raise ConfigError(
            f"model.optimizer AdamW8bit: bitsandbytes cannot run 8-bit AdamW on {device} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); `pip install bitsandbytes` "
            "(CPU support needs >= 0.45), or use torch.optim.AdamW / haipai_lightning.optimizers.QGaLoreAdamW"
        ) from e
    return bnb
