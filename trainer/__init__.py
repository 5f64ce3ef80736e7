"""Training step and loop, data, optimizer, metrics and checkpoints."""
