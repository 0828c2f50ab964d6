"""Training: the Lightning module, parameter groups and LR schedules, memory-lean optimizers."""
