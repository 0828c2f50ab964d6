"""Calibrated weight quantization of a whole model: GPTQ or GuidedQuant, layer after layer.

The unique layers are solved in the order of their first application (prelude, shared block,
coda), as GPTQ does block by block (arXiv 2210.17323, section 5, "quantizing one Transformer
block at a time ... the inputs of the next block are the outputs of the already quantized one"):
the statistics of layer i are collected by running the model whose earlier layers already hold
their quantized (dequantized fp32) weights. A MoR shared block is one unique layer: its
Hessians sum the inputs of all its recursion steps. Within a layer all linears are solved from
one pass (the fp32 inputs of that layer). Experts of routed MLPs (MoE / MoT) are solved one by
one from the rows routed to each; an expert that no calibration row reached is rounded to
nearest. At the end the linears become QLinear and the expert stacks QExperts, in the same
storage formats as round-to-nearest (so exports and loading do not change).

Not calibrated here (round-to-nearest in methods.py): the embedding table and the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.mlps.experts import Experts
from haipai_lightning.quant.calibration import Batch, block_linears, collect_stats, unique_layer_order
from haipai_lightning.quant.gptq import Quantized, gptq_quantize, quantize_rtn
from haipai_lightning.quant.guided import guided_quantize
from haipai_lightning.quant.hadamard import hadamard, has_hadamard
from haipai_lightning.quant.layers import QLinear
from haipai_lightning.quant.lnq import lnq_solve
from haipai_lightning.quant.qexperts import QExperts, group_for
from haipai_lightning.quant.qtensor import QuantizedWeight


def online_hadamard_for(parent: nn.Module, name: str, lin: nn.Module, rotate: bool, act_bits: int | None) -> bool:
    """QuaRot's online Hadamard before a SwiGLU down projection (4-bit activations after a rotation)."""
    return (rotate and act_bits is not None and isinstance(parent, SwiGLU) and name == "w2"
            and has_hadamard(lin.in_features))


def _orth(k: int) -> torch.Tensor:
    return hadamard(k) / math.sqrt(k)  # float64, orthogonal


def qlinear_rtn(lin: nn.Linear, bits: int, group_size: int, act_bits: int | None, online: bool,
                codebook: bool = False) -> QLinear:
    """Round-to-nearest QLinear for any of 8 / 4 / 3 / 2 bits (3 / 2 in the int4 container).
    codebook: the empty LNQ layout (per-row 2^bits levels) that a loaded export fills."""
    g = group_for(lin.in_features, group_size)
    if codebook:
        return QLinear(QuantizedWeight(lin.out_features, lin.in_features, 4, g, codebook=2**bits), act_bits, online)
    if bits in (4, 8):
        return QLinear.from_linear(lin, bits, g, act_bits, online)
    w = lin.weight.detach().double()
    if online:
        w = w @ _orth(w.size(1))
    return QLinear(quantize_rtn(w.float(), bits, g).to_qweight(), act_bits, online)


@torch.no_grad()
def quantize_experts_rtn(ex: Experts, bits: int, group_size: int, act_bits: int | None) -> QExperts:
    out: dict[str, list] = {"w1": [], "w3": [], "w2": []}
    for e in range(ex.n_experts):
        for name in out:
            w = getattr(ex, name)[e].detach().t().float()  # (out, in)
            out[name].append(quantize_rtn(w, bits, group_for(w.size(1), group_size)).to_qweight())
    return QExperts.from_qweights(out["w1"], out["w3"], out["w2"], act_bits)


def _solve(w: torch.Tensor, h: torch.Tensor | None, bits: int, group_size: int, solver: str) -> Quantized:
    g = group_for(w.size(1), group_size)
    if solver == "lnq" and bits != 8:  # an unreached layer (h None) still gets a codebook: H = I
        return lnq_solve(w, torch.eye(w.size(1), dtype=torch.float64) if h is None else h, bits)
    if h is None:
        return quantize_rtn(w.float(), bits, g)
    if solver in ("guided", "lnq") and h.dim() == 3:
        return guided_quantize(w, h, bits, g)
    return gptq_quantize(w, h, bits, g)


@torch.no_grad()
def quantize_calibrated(model: nn.Module, batches: list[Batch], bits: int, group_size: int = 32,
                        act_bits: int | None = None, solver: str = "gptq", rotate: bool = False,
                        guided_groups: int = 4) -> dict[str, float]:
    """Replace every block linear (and expert) of `model` in place by its GPTQ / GuidedQuant solution.

    Returns key -> relative layer-wise error tr(dW H dW^T) / tr(W H W^T) (a diagnostic)."""
    guided = solver in ("guided", "lnq")  # LNQ solves under the guided (block-diagonal Fisher) objective
    done: dict[str, tuple[nn.Module, str, Quantized, bool]] = {}
    done_experts: dict[int, dict[str, list[Quantized]]] = {}
    errors: dict[str, float] = {}
    for li in unique_layer_order(model):
        layer = model.layers[li]
        lins = block_linears(layer, f"layers.{li}")
        ex = getattr(layer.mlp, "experts", None) if getattr(layer.mlp, "routed", False) else None
        exd = {f"layers.{li}.mlp.experts": ex} if isinstance(ex, Experts) else {}
        stats = collect_stats(model, batches, lins, {} if guided else exd, guided_groups if guided else 0)
        if guided and exd:
            stats.update(collect_stats(model, batches, {}, exd))
        for key, (parent, name) in lins.items():
            lin = getattr(parent, name)
            online = online_hadamard_for(parent, name, lin, rotate, act_bits)
            w = lin.weight.detach().double()
            h = stats.get(key)
            if online:  # (x Hm)(W Hm)^T: quantize W Hm under the Hessian of x Hm
                hm = _orth(w.size(1))
                w = w @ hm
                h = None if h is None else hm.T @ h @ hm
            q = _solve(w, h, bits, group_size, solver)
            deq = q.dequantize().double()
            if h is not None:
                hh = h if h.dim() == 2 else h.mean(0)
                errors[key] = float(torch.einsum("nk,kl,nl->", w - deq, hh, w - deq) /
                                    torch.einsum("nk,kl,nl->", w, hh, w).clamp(min=1e-30))
            lin.weight.copy_((deq @ hm.T if online else deq).to(lin.weight.dtype))  # later layers see it
            done[key] = (parent, name, q, online)
        if exd:
            key = next(iter(exd))
            sol: dict[str, list[Quantized]] = {"w1": [], "w3": [], "w2": []}
            for e in range(ex.n_experts):
                for name, src in (("w1", "in"), ("w3", "in"), ("w2", "hidden")):
                    param = getattr(ex, name)
                    w = param[e].detach().t().double()  # (out, in)
                    # experts keep the uniform format under every solver (GPTQ for lnq): QExperts has no codebooks
                    q = _solve(w, stats.get(f"{key}.{e}.{src}"), bits, group_size, "gptq")
                    param[e].copy_(q.dequantize().t().to(param.dtype))
                    sol[name].append(q)
            done_experts[li] = sol
    for parent, name, q, online in done.values():
        setattr(parent, name, QLinear(q.to_qweight(), act_bits, online))
    for li, sol in done_experts.items():
        model.layers[li].mlp.experts = QExperts.from_qweights(*([q.to_qweight() for q in sol[n]]
                                                                 for n in ("w1", "w3", "w2")), act_bits=act_bits)
    return errors
