from haipai_lightning.mlps.dense import SwiGLU
from haipai_lightning.mlps.experts import Experts
from haipai_lightning.mlps.moe import AdaptiveTopPMoE, ExpertChoiceMoE, TokenChoiceMoE
from haipai_lightning.mlps.mot import MixtureOfTokens

__all__ = ["SwiGLU", "Experts", "TokenChoiceMoE", "ExpertChoiceMoE", "AdaptiveTopPMoE", "MixtureOfTokens"]
