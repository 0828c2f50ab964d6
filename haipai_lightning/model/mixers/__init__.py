from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.mixers.mamba import Mamba

__all__ = ["Attention", "Mamba"]
