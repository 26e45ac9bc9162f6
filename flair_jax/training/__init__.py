"""Pre-training: set-up, the jitted step, the loop, checkpoints and logs."""
