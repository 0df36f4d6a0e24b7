"""The version, defined once: pyproject.toml reads it from here (``[tool.setuptools.dynamic]``).

A module of its own so that the version is known without importing the package.
"""

__version__ = "0.1.0"
