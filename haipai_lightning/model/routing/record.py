"""RouterRecord: what one routing component decided in one forward pass.

The model never logs and keeps no global state: every router (depth routers, Mixture-of-Depths
gates, MoE / MoT routers) appends a record, and the Lightning module (aux losses), telemetry and
FLOP counting read them. Its fields are typed (group, choice, step, layer, application), so no
reader parses a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterRecord:
    group: str  # what is routed: "depth" (MoR recursion steps), "mod" (Mixture-of-Depths), "moe", "mot", ...
    choice: str | None = None  # "expert_choice" | "token_choice" | "top_p" | ... (None: a gate / mixture)
    scores: torch.Tensor | None = None  # router probabilities (B, T) or (B, T, E), detached
    selected: torch.Tensor | None = None  # bool (B, T): took part; or int (B, T[, k]) choice ids / depths
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted terms
    aux_weights: dict[str, float] = field(default_factory=dict)  # weight of each term in the loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. sampling accuracy, capacity
    step: int | None = None  # recursion step (expert-choice depth routing)
    layer: int | None = None  # unique layer id (routed MLPs)
    application: int | None = None  # MoD: the layer application index; routed MLPs: n-th call in this pass

    @property
    def is_depth(self) -> bool:
        """Does `selected` describe recursion depth (bool: ran this step; int: a depth in 1..Nr)?"""
        return self.group == "depth"

    @property
    def name(self) -> str:
        """Unique within a forward pass: 'depth/step1', 'depth/token_choice', 'mod/layer3', 'moe/layer2/0'."""
        if self.group == "depth":
            return f"depth/step{self.step}" if self.step is not None else f"depth/{self.choice}"
        if self.group == "mod":
            return f"mod/layer{self.application}"
        if self.layer is not None:
            return f"{self.group}/layer{self.layer}" + ("" if self.application is None else f"/{self.application}")
        return self.group if self.choice is None else f"{self.group}/{self.choice}"

    @property
    def telemetry_group(self) -> str:
        """Records of one group share a per-token depth / a panel: 'depth', 'mod', 'moe/layer2'."""
        if self.group in ("depth", "mod") or self.layer is None or self.application is None:
            return self.group
        return f"{self.group}/layer{self.layer}"

    @property
    def kind(self) -> str:
        """'depth_expert_choice', 'moe_token_choice', 'mod', 'mot' (a short label for tables)."""
        return self.group if self.choice is None else f"{self.group}_{self.choice}"


def next_application(records: list[RouterRecord], group: str, layer: int) -> int:
    """How many records of (group, layer) this forward pass already holds: a layer of MoR's shared
    block is applied once per recursion step, and each application gets its own record."""
    return sum(1 for r in records if r.group == group and r.layer == layer)
