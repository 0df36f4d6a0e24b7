"""featpipe: frozen ImageNet CNN features for video clips, cached in HDF5, then fast sequence models.

The Python API mirrors the command line, with the same defaults:

    import featpipe
    featpipe.extract(backbone="inceptionv3", data="data")      # -> ExtractResult (cache path, counts, failures)
    featpipe.extract(backbone="inceptionv3", shard="2/4")      # one of 4 shards -> cache/inceptionv3.shard-2-of-4.h5
    featpipe.merge(output="cache/inceptionv3.h5")              # the 4 shards -> one cache (Path)
    featpipe.train(head="gru")                                 # -> TrainResult (run directory, metrics)
    featpipe.evaluate("models/latest", split="test")           # -> dict of metrics
    featpipe.predict("clip.mp4", model="models/latest")        # a file, a folder or a list -> [Prediction]
    featpipe.info("cache/inceptionv3.h5")                      # -> lines describing a cache or a run
    featpipe.linear_probe("cache/inceptionv3.h5")              # -> test metrics of the baseline heads must match

Keras is imported only when a function needs it.
"""

# The functions share their names with the modules that define them; binding them here, after
# the modules are loaded, makes ``featpipe.extract`` the function (``featpipe.extract.ExtractOptions``
# stays importable with ``from featpipe.extract import ExtractOptions``).
from featpipe._version import __version__
from featpipe.baselines import linear_probe  # noqa: E402
from featpipe.cache import merge_shards as merge  # noqa: E402
from featpipe.errors import FeatpipeError
from featpipe.evaluate import evaluate  # noqa: E402
from featpipe.extract import ExtractOptions, ExtractResult, extract  # noqa: E402
from featpipe.info import info  # noqa: E402
from featpipe.predict import Prediction, predict  # noqa: E402
from featpipe.train import TrainOptions, TrainResult, train  # noqa: E402
from featpipe.tune import TuneOptions, TuneResult, tune  # noqa: E402

__all__ = [
    "FeatpipeError",
    "__version__",
    "extract",
    "ExtractOptions",
    "ExtractResult",
    "merge",
    "train",
    "TrainOptions",
    "TrainResult",
    "evaluate",
    "predict",
    "Prediction",
    "info",
    "tune",
    "TuneOptions",
    "TuneResult",
    "linear_probe",
]
