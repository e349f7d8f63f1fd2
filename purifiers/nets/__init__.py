"""Re-implementations of the authors' score networks, with the parameter names of their checkpoints."""
