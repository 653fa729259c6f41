"""Training: run config, data, step, loop, logging and checkpoints."""
