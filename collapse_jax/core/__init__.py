"""The shared core: the generational scan loop and the neural host loop, data policies, runs, reports, checkpoints, training."""
