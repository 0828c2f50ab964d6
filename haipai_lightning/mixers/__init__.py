from haipai_lightning.mixers.attention import Attention
from haipai_lightning.mixers.mamba import Mamba

__all__ = ["Attention", "Mamba"]
