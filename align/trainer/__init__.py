"""The training loop (six named phases) and the per-algorithm pieces (PPO, GRPO)."""
