"""Where stage one's backbone runs: the engine interface and registry (``base``), ``local`` and ``ray``."""
