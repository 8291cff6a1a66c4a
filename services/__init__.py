"""genloop control plane: config, registry, evaluation gate, lifecycle, CLI."""
