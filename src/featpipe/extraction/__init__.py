"""Stage one: extract() turns a dataset into a cache through decode -> embed -> write, on a local or Ray engine."""
