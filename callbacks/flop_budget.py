"""FlopBudget: stop training when the FLOPs actually spent reach a budget (IsoFLOP runs)."""

from __future__ import annotations

import lightning as L

from haipai_lightning.analysis.flops import training_flops


class FlopBudget(L.Callback):
    """Counts training FLOPs from each step's routing records and stops at `max_flops`.

    Routed models spend less per token, so under one budget they see more tokens: the
    comparison the MoR paper makes (IsoFLOP). Logs `train/flops` (cumulative).
    """

    def __init__(self, max_flops: float | None = None) -> None:
        """Args:
            max_flops: training FLOP budget (None = count and log only).
        """
        self.max_flops = max_flops
        self.flops = 0.0
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        B, T = batch["input_ids"].shape
        self.flops += training_flops(pl_module.model, pl_module.last_records, B, T)
        self.tokens += B * T
        pl_module.log("train/flops", self.flops)
        if self.max_flops is not None and self.flops >= self.max_flops:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"flops": self.flops, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.flops, self.tokens = state["flops"], state["tokens"]
