"""ACMPhases: the training phases of Adaptive Computation Modules (arXiv 2312.10193) in a `haipai fit` run.

    trainer:
      callbacks:
        - class_path: callbacks.ACMPhases
          init_args: {dense_ckpt: runs/dense/last.ckpt, distill_steps: 200, gate_steps: 100}
    model:
      mlp: {class_path: haipai_lightning.AdaptiveComputationModule, init_args: {n_learners: 4, budget: 0.5}}

At fit start the dense checkpoint's weights are copied into the ACM model (same config, dense MLPs) and every
dense MLP is split into the learners of its ACM (haipai_lightning.train.acm.load_dense_into). Steps
[0, distill_steps) distill the learners, the next gate_steps pre-train the gates, and the rest trains end to
end. The phase follows the global step, so a resumed run continues in the right phase -- but the teachers
are not in checkpoints: resume only after the distill and gate phases, or rerun them.
"""

from __future__ import annotations

import lightning as L

from haipai_lightning.config import ConfigError
from haipai_lightning.train.acm import acm_modules, load_dense_into, phase_at, set_acm_phase


class ACMPhases(L.Callback):
    def __init__(self, dense_ckpt: str | None = None, distill_steps: int = 200, gate_steps: int = 100) -> None:
        """Args:
            dense_ckpt: a dense checkpoint of the same config to ACMize (None: the ACMs already have teachers).
            distill_steps: steps of learner distillation.
            gate_steps: steps of gate pre-training; end-to-end training follows.
        """
        if distill_steps < 0 or gate_steps < 0:
            raise ConfigError(f"callbacks.ACMPhases: distill_steps={distill_steps} and gate_steps={gate_steps} "
                              "must be >= 0")
        self.dense_ckpt, self.distill_steps, self.gate_steps = dense_ckpt, distill_steps, gate_steps
        self.phase: str | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not acm_modules(pl_module.model):
            raise ConfigError("callbacks.ACMPhases needs model.mlp: haipai_lightning.AdaptiveComputationModule")
        if self.dense_ckpt is not None and trainer.global_step < self.distill_steps + self.gate_steps:
            from haipai_lightning.io.loader import load_model

            dense, _ = load_model(self.dense_ckpt)
            load_dense_into(pl_module.model, dense.to(pl_module.device))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        phase = phase_at(trainer.global_step, self.distill_steps, self.gate_steps)
        if phase != self.phase:
            set_acm_phase(pl_module.model, phase)
            self.phase = phase
