"""Training: optimizer, train state and step, loop, checkpoints, metrics, preemption."""
