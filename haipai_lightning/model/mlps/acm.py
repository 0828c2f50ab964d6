"""Adaptive Computation Module (ACM; Wojcik et al., "Adaptive Computation Modules: Granular Conditional
Computation for Efficient Inference", arXiv 2312.10193) as an MLP factory.

The MLP is split into N *learners*, small SwiGLUs of hidden size H / N (together the parameters and
compute of the dense MLP). The output after k learners is their running sum

    S_k(x) = sum_{j < k} learner_j(x)        (B, T, D)

so every further learner refines the previous ones' output. A small gating network (D -> gate_hidden ->
N logits) chooses, per token, k in 1..N. Outside training the choice is the argmax (causal: a token's
k depends on that token alone, so decoding with a KV cache gives the full forward's logits) and the
compute is real: the tokens are sorted by k once, learner j runs only on the rows of the tokens with
k > j (a prefix of the sorted rows), and the sum is permuted back; a skipped learner costs nothing.

Training follows the paper's three phases (`phase`, set by `haipai_lightning.train.acm.set_acm_phase`):
  distill     the layer outputs the frozen dense MLP (its teacher, `load_dense`); only the learners
              train, on the mean over k of ||S_k(x) - f(x)||^2 / ||f(x)||^2 (every prefix must
              approximate the teacher, so any k is usable);
  gate        the layer still outputs the teacher; only the gate trains, by cross-entropy towards the
              smallest k whose relative error ||S_k - f||^2 / ||f||^2 is <= `gate_tolerance`;
  end_to_end  (the default, also for training from scratch) the layer outputs S_k with k drawn by a
              straight-through Gumbel-softmax over the gate's logits (forward: one S_k, backward: the
              soft mixture), plus a budget loss (E[k] / N - budget)^2 towards the target fraction
              `budget`; every learner runs on every token here (the gate's gradient needs all S_k).

Routed-MLP protocol as in moe.py: forward(x (B, T, D), records) appends a RouterRecord named
`acm/layer<i>/<n>`: scores (B, T, N) the gate's softmax, selected int (B, T) the choice index k - 1,
metrics mean_active_blocks (mean k), active_fraction (mean k / N) and expert_rows (learner rows
computed, for FLOP counting: `self.experts` holds the learners' stacked weights).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mlps.experts import Experts
from haipai_lightning.model.routing.record import RouterRecord, next_application

Phase = Literal["distill", "gate", "end_to_end"]
PHASES = ("distill", "gate", "end_to_end")


class AdaptiveComputationModule(nn.Module):
    routed = True

    def __init__(
        self,
        cfg: ModelConfig,
        n_learners: int = 4,
        gate_hidden: int = 64,
        budget: float | None = 0.5,
        budget_loss_weight: float = 0.1,
        gate_tolerance: float = 0.1,
        gumbel_temperature: float = 1.0,
        phase: Phase = "end_to_end",
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_learners: N; must divide the MLP hidden size cfg.ffn_dim (each learner has ffn_dim / N).
            gate_hidden: hidden size of the gating network.
            budget: target mean fraction of learners E[k] / N in (0, 1] (null = no budget loss).
            budget_loss_weight: weight of the budget loss in end-to-end training.
            gate_tolerance: gate pre-training label = smallest k with relative error <= this.
            gumbel_temperature: temperature of the straight-through Gumbel-softmax.
            phase: distill | gate | end_to_end (see the module docstring).
        """
        super().__init__()
        H = cfg.ffn_dim
        if n_learners < 1 or H % n_learners:
            raise ConfigError(f"model.mlp.init_args.n_learners={n_learners} must be >= 1 and divide the MLP hidden "
                              f"size {H} (model.config.ffn_hidden); e.g. one of {[n for n in (2, 4, 8) if H % n == 0]}")
        if budget is not None and not 0 < budget <= 1:
            raise ConfigError(f"model.mlp.init_args.budget={budget} must be in (0, 1] (a fraction of the learners) "
                              "or null")
        if gate_hidden < 1 or gate_tolerance < 0 or gumbel_temperature <= 0:
            raise ConfigError(f"model.mlp.init_args: gate_hidden={gate_hidden} must be >= 1, gate_tolerance="
                              f"{gate_tolerance} >= 0 and gumbel_temperature={gumbel_temperature} > 0")
        self.n_learners, self.budget, self.budget_loss_weight = n_learners, budget, budget_loss_weight
        self.gate_tolerance, self.gumbel_temperature = gate_tolerance, gumbel_temperature
        self.phase = phase  # validated by the setter
        # learners as stacked SwiGLU weights (N, D, H/N): the same storage MoE experts use (FLOPs, quantization)
        self.experts = Experts(cfg, n_learners, H // n_learners, dispatch="loop")
        self.gate = nn.Sequential(nn.Linear(cfg.d_model, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, n_learners))
        self.forced_k: int | None = None  # every token runs exactly this many learners (tests, compute sweeps)
        self._teacher: list[nn.Module] = []  # the dense MLP being distilled; a list, so it is no submodule
        self.layer_index = 0  # set by the Block that holds this MLP

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value not in PHASES:
            raise ConfigError(f"model.mlp.init_args.phase={value!r}: use one of {', '.join(PHASES)}")
        self._phase = value

    @property
    def top_k(self) -> int:
        """Nominal learners per token (FLOP counting without a record): all N."""
        return self.n_learners

    # ------------------------------------------------------------ learners
    def learner(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """learner_j on rows x (M, D) -> (M, D)."""
        e = self.experts
        return (F.silu(x @ e.w1[j]) * (x @ e.w3[j])) @ e.w2[j]

    def prefix_sums(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, D) -> S (N, M, D): S[k-1] = sum of the first k learners (every learner on every row)."""
        outs, acc = [], None
        for j in range(self.n_learners):
            acc = self.learner(j, x) if acc is None else acc + self.learner(j, x)
            outs.append(acc)
        return torch.stack(outs)

    def run_k(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x (M, D), k (M,) long in 1..N -> (sum of the first k[m] learners on row m (M, D), rows computed).

        Conditional compute: rows sorted by k (descending), learner j runs on the prefix of the rows
        with k > j only, and its output is added to that prefix; one permutation back at the end.
        """
        order = k.argsort(descending=True, stable=True)
        xs, ks = x.index_select(0, order), k.index_select(0, order)
        counts = [int(c) for c in (ks[None, :] > torch.arange(self.n_learners, device=k.device)[:, None]).sum(1)]
        out = torch.zeros_like(xs)
        for j, c in enumerate(counts):
            if c == 0:
                break  # counts are non-increasing: no later learner has rows either
            out = out + F.pad(self.learner(j, xs[:c]), (0, 0, 0, xs.size(0) - c))
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return out.index_select(0, inv), sum(counts)

    # ------------------------------------------------------------ teacher
    @torch.no_grad()
    def load_dense(self, mlp: nn.Module, calibration: torch.Tensor | None = None) -> None:
        """Initialise the learners by splitting a dense SwiGLU's (w1, w3, w2) hidden units into N groups, most
        important first, and keep `mlp` (frozen) as the teacher of the distill / gate phases.

        A SwiGLU is a sum over its hidden units, so the N groups sum to the dense MLP exactly (S_N = f at
        the start of distillation). Importance of unit u: E|silu(w1_u x) (w3_u x)| * ||w2_u|| over the
        calibration rows (N', D), or ||w1_u|| ||w3_u|| ||w2_u|| without them.
        """
        W1, W3, W2 = mlp.w1.weight, mlp.w3.weight, mlp.w2.weight  # (H, D), (H, D), (D, H)
        H = W1.size(0)
        if H != self.n_learners * self.experts.hidden:
            raise ConfigError(f"load_dense: the dense MLP has {H} hidden units; {self.n_learners} learners of "
                              f"{self.experts.hidden} need {self.n_learners * self.experts.hidden}")
        if calibration is not None:
            act = (F.silu(calibration @ W1.t()) * (calibration @ W3.t())).abs().mean(0)  # (H,)
        else:
            act = W1.norm(dim=1) * W3.norm(dim=1)
        order = (act * W2.norm(dim=0)).argsort(descending=True).view(self.n_learners, -1)  # (N, H/N)
        self.experts.w1.copy_(W1[order].transpose(1, 2))  # (N, D, H/N)
        self.experts.w3.copy_(W3[order].transpose(1, 2))
        self.experts.w2.copy_(W2.t()[order])  # (N, H/N, D)
        for p in mlp.parameters():
            p.requires_grad_(False)
        self._teacher = [mlp]

    def drop_teacher(self) -> None:
        self._teacher = []

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        N = self.n_learners
        flat = x.reshape(-1, D)
        logits = self.gate(flat).float()  # (M, N): choice m = m + 1 learners
        probs = logits.softmax(-1)
        aux: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if self.phase != "end_to_end":
            if not self._teacher:
                raise ConfigError(f"ACM phase {self.phase!r} needs the dense MLP it distills: call load_dense(mlp) "
                                  "(haipai_lightning.train.acm.acmize) or use phase end_to_end")
            target = self._teacher[0](flat).detach()  # (M, D)
            out, k, rows = target, probs.argmax(-1) + 1, 0
            if self.training:
                aux, weights = self._phase_loss(flat, target, logits)
        elif self.forced_k is not None:
            k = torch.full((flat.size(0),), self.forced_k, dtype=torch.long, device=x.device)
            out, rows = self.run_k(flat, k)
        elif self.training:
            onehot = F.gumbel_softmax(logits, tau=self.gumbel_temperature, hard=True)  # (M, N) straight-through
            S = self.prefix_sums(flat)  # (N, M, D)
            out = torch.einsum("mn,nmd->md", onehot.to(S.dtype), S)
            k, rows = onehot.argmax(-1) + 1, N * flat.size(0)
            if self.budget is not None:
                expected = (probs * torch.arange(1, N + 1, device=x.device)).sum(-1).mean() / N
                aux["budget"], weights["budget"] = (expected - self.budget) ** 2, self.budget_loss_weight
        else:
            k = probs.argmax(-1) + 1
            out, rows = self.run_k(flat, k)
        if records is not None:
            metrics = {"mean_active_blocks": k.float().mean().detach(), "active_fraction": k.float().mean().detach() / N,
                       "expert_rows": torch.tensor(float(rows))}
            records.append(RouterRecord("acm", "learners", probs.detach().view(B, T, N), (k - 1).view(B, T), aux,
                                        weights, metrics, layer=self.layer_index,
                                        application=next_application(records, "acm", self.layer_index)))
        return out.view(B, T, D)

    def _phase_loss(self, flat: torch.Tensor, target: torch.Tensor, logits: torch.Tensor):
        """The distill / gate phase's loss on rows flat (M, D) against the teacher's target (M, D)."""
        norm = target.pow(2).sum(-1).clamp(min=1e-12)  # (M,)
        if self.phase == "distill":
            S = self.prefix_sums(flat)  # (N, M, D)
            rel = (S - target).pow(2).sum(-1) / norm  # (N, M)
            return {"distill": rel.mean()}, {"distill": 1.0}
        with torch.no_grad():
            rel = (self.prefix_sums(flat) - target).pow(2).sum(-1) / norm  # (N, M)
            ok = rel <= self.gate_tolerance
            ok[-1] = True  # all N learners is always allowed
            label = ok.float().argmax(0)  # smallest k - 1 within tolerance
        return {"gate_ce": F.cross_entropy(logits, label)}, {"gate_ce": 1.0}
