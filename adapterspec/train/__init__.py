"""`adapterspec train`: options, data, the training loop on mlx-lm's trainer pieces, checkpoints and resume, progress."""
