"""Studies built on the trainer: sweeps, transfer metrics, (later) efficiency and order studies."""
