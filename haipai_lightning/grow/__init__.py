"""Growth: the ops as pure functions (ops.py) and what they do to the architecture (arch.py)."""
