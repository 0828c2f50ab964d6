"""Routing: which tokens take which computation (MoR depth routers, the MoD / expert-choice gate,
gather / scatter of the chosen tokens, the records routers leave, the losses they share)."""

from haipai_lightning.model.routing.base import FullRecursion, Router, RunFn
from haipai_lightning.model.routing.expert_choice import ExpertChoiceRouter
from haipai_lightning.model.routing.gate import TopKGate, capacity_k
from haipai_lightning.model.routing.losses import balance_loss, loss_free_bias_update, max_violation, z_loss
from haipai_lightning.model.routing.record import RouterRecord, next_application
from haipai_lightning.model.routing.selection import Selection, select_mask, select_topk, spaced_mask
from haipai_lightning.model.routing.token_choice import TokenChoiceRouter

__all__ = ["ExpertChoiceRouter", "FullRecursion", "Router", "RouterRecord", "RunFn", "Selection", "TokenChoiceRouter",
           "TopKGate", "balance_loss", "capacity_k", "loss_free_bias_update", "max_violation", "next_application",
           "select_mask", "select_topk", "spaced_mask", "z_loss"]
