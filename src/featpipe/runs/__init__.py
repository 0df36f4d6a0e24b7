"""The run directory (docs/run-directory.md) and what reads it: evaluate, predict, metrics, info."""
