"""Quantization: the low-bit codec, quantized tensors and layers, rotations, KV quantization, methods."""
