"""Training: schedules, optimizers, checkpoints, the step loop and the supervised runner."""
