"""Parameter-efficient tuning: (routed) low-rank adapters on chosen linear maps."""
