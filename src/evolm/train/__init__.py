"""Training: optimizer and schedules, the pretraining loop and its stages, post-training."""
