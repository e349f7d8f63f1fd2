"""Re-implementations of the score networks the papers' public checkpoints were trained with, under the reference
implementations' parameter names so that those checkpoints load as they are (see :mod:`purifiers.checkpoints`)."""
