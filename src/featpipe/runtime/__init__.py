"""Process-wide plumbing: importing and quieting Keras, devices and memory, signals, atomic file writes."""
