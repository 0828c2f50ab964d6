"""One forward pass: the decoder (HaipaiModel, Block, Mixture-of-Depths), the sharing schedule,
routing, RoPE, the KV cache, activation checkpointing; mixers/ and mlps/ beside them."""

from haipai_lightning.model.decoder import Block, HaipaiModel, ModelOutput

__all__ = ["Block", "HaipaiModel", "ModelOutput"]
