from haipai_lightning.mixers.attention import Attention

__all__ = ["Attention"]
