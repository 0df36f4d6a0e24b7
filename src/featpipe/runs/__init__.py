"""The run directory (docs/run-directory.md) and what reads it: evaluate, predict, metrics, info.

Reading a run from Python: ``featpipe.runs.read_run(path)`` (the directory and its typed ``RunInfo``)
and ``featpipe.runs.load_run(path)`` (also the checked model); both load no Keras until a model is.
"""

from featpipe.errors import RunWarning
from featpipe.runs.rundir import RunInfo, load_run, read_run

__all__ = ["RunInfo", "RunWarning", "load_run", "read_run"]
