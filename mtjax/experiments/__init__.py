"""Studies built on the trainer (the registry in experiments.registry: efficiency, transfer and
order, entropy, decomposition, instructions) and config sweeps (experiments.sweep)."""
