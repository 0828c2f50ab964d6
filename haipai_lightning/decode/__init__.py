"""Decoding: sampling, cached generation, speculative decoding, the depth-wise batching engine."""
