from haipai_lightning.mlps.dense import SwiGLU

__all__ = ["SwiGLU"]
