"""Checkpoints: the run's checkpoints folder, sharded training checkpoints, weights-only checkpoints."""
