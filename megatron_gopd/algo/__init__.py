"""Objectives (G-OPD, GRPO, SFT), their losses and advantages, and vocab-parallel log-probs / entropy / KL."""
