"""ACMization and the three training phases of Adaptive Computation Modules (arXiv 2312.10193).

    acmize(dense_model, n_learners=4, ...)  -> a copy of the dense model whose MLPs are ACMs: every other
                                               weight copied, each ACM's learners split from its dense MLP
                                               (which becomes the ACM's frozen teacher)
    set_acm_phase(model, phase)             -> distill (learners train) | gate (gates train) |
                                               end_to_end (everything trains; the teachers are dropped)
    phase_at(step, distill_steps, gate_steps) -> the phase of a training step (callbacks.ACMPhases)
    train_acm_phases(model, batches, ...)   -> the three phases as one plain loop (benchmarks, notebooks)

The phases are a function of the step, so a resumed run is in the same phase as the run it continues.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from haipai_lightning.config import ConfigError
from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mlps.acm import PHASES, AdaptiveComputationModule


def acm_modules(model: HaipaiModel) -> list[AdaptiveComputationModule]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, AdaptiveComputationModule)]


@torch.no_grad()
def load_dense_into(model: HaipaiModel, dense: HaipaiModel, calibration_ids: torch.Tensor | None = None) -> None:
    """Copy a dense model's weights into an ACM model of the same shape (in place: optimizers keep their
    parameters) and split every dense MLP into the learners of the ACM in its place."""
    acms = acm_modules(model)
    if not acms or len(model.layers) != len(dense.layers):
        raise ConfigError("ACMization needs a model whose MLPs are haipai_lightning.AdaptiveComputationModule and "
                          f"a dense model of the same layers ({len(model.layers)} vs {len(dense.layers)} unique layers)")
    own = model.state_dict()
    keep = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    bad = [k for k, v in keep.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ConfigError(f"the dense model does not match the ACM model's architecture at {bad[:3]}")
    model.load_state_dict(keep, strict=False)
    inputs: dict[int, torch.Tensor] = {}
    if calibration_ids is not None:  # the MLP inputs on calibration text: importance of the hidden units
        def keep_input(i: int):
            def hook(module, args, output) -> None:  # returns None: the output is left alone
                inputs.setdefault(i, args[0].reshape(-1, args[0].size(-1)))
            return hook

        hooks = [layer.mlp.register_forward_hook(keep_input(i)) for i, layer in enumerate(dense.layers)]
        was = dense.training
        dense.eval()(calibration_ids)
        dense.train(was)
        for h in hooks:
            h.remove()
    for i, (layer, dl) in enumerate(zip(model.layers, dense.layers)):
        layer.mlp.load_dense(copy.deepcopy(dl.mlp), inputs.get(i))


def acmize(dense: HaipaiModel, calibration_ids: torch.Tensor | None = None, **acm_args: Any) -> HaipaiModel:
    """A new model: `dense` with every MLP replaced by an AdaptiveComputationModule(**acm_args), distilled from it
    (phase `distill` set). `dense` is left unchanged."""
    f = dense.factories
    model = HaipaiModel(dense.cfg, mixer=f["mixer"], router=f["router"],
                        mlp=functools.partial(AdaptiveComputationModule, **acm_args))
    model.to(next(dense.parameters()).device)
    load_dense_into(model, dense, calibration_ids)
    set_acm_phase(model, "distill")
    return model


def set_acm_phase(model: HaipaiModel, phase: str) -> None:
    """Set every ACM's phase and which parameters train: distill -> the learners only; gate -> the gates only;
    end_to_end -> every parameter (and the teachers are released)."""
    if phase not in PHASES:
        raise ConfigError(f"ACM phase {phase!r}: use one of {', '.join(PHASES)}")
    acms = acm_modules(model)
    for p in model.parameters():
        p.requires_grad_(phase == "end_to_end")
    for m in acms:
        m.phase = phase
        part = m.experts if phase == "distill" else m.gate if phase == "gate" else None
        if part is not None:
            for p in part.parameters():
                p.requires_grad_(True)
        if phase == "end_to_end":
            m.drop_teacher()


def phase_at(step: int, distill_steps: int, gate_steps: int) -> str:
    return "distill" if step < distill_steps else "gate" if step < distill_steps + gate_steps else "end_to_end"


def train_acm_phases(model: HaipaiModel, batches: Iterator[dict[str, torch.Tensor]], distill_steps: int,
                     gate_steps: int, end_to_end_steps: int, lr: float = 3e-3,
                     final_lr_fraction: float = 1.0) -> list[tuple[str, float]]:
    """The paper's three phases in one loop (AdamW, next-token loss + the records' weighted aux losses; the
    learning rate decays linearly to lr * final_lr_fraction, 1 = constant). Returns (phase, loss) per step."""
    total = distill_steps + gate_steps + end_to_end_steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - (1.0 - final_lr_fraction) * i / max(total, 1))
    log = []
    model.train()
    for step in range(total):
        phase = phase_at(step, distill_steps, gate_steps)
        if step == 0 or phase != log[-1][0]:
            set_acm_phase(model, phase)
        b = next(batches)
        out = model(b["input_ids"])
        loss = sum(out.aux_losses.values(), torch.zeros(()))
        if phase == "end_to_end":  # before it the layers output their teachers: the LM loss trains nothing
            loss = loss + F.cross_entropy(out.logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append((phase, loss.item()))
    return log
