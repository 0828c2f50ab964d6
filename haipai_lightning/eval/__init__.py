"""Evaluation: perplexity, the lm-eval adapter and shipped local tasks, the quantization report."""
