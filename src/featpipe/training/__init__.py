"""Stage two: training inputs and streaming, the heads, train, tune and the baselines."""
