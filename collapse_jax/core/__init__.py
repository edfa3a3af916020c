"""The shared core: the generational loop, data policies, runs, reports, checkpoints, training."""
