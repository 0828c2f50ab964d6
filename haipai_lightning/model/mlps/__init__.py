from haipai_lightning.model.mlps.acm import AdaptiveComputationModule
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.mlps.experts import Experts
from haipai_lightning.model.mlps.moe import AdaptiveTopPMoE, ExpertChoiceMoE, TokenChoiceMoE
from haipai_lightning.model.mlps.mot import MixtureOfTokens

__all__ = ["SwiGLU", "Experts", "TokenChoiceMoE", "ExpertChoiceMoE", "AdaptiveTopPMoE", "MixtureOfTokens",
           "AdaptiveComputationModule"]
