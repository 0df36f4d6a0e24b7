"""featpipe: frozen ImageNet CNN features for video clips, cached in HDF5, then fast sequence models.

The Python API mirrors the command line, with the same defaults:

    import featpipe
    featpipe.extract(backbone="inceptionv3", data="data")      # -> ExtractResult (cache path, counts, failures)
    featpipe.extract(backbone="inceptionv3", shard="2/4")      # one of 4 shards -> cache/inceptionv3.shard-2-of-4.h5
    featpipe.merge(output="cache/inceptionv3.h5")              # the 4 shards -> one cache (Path)
    featpipe.train(head="gru")                                 # -> TrainResult (run directory, metrics)
    featpipe.evaluate("models/latest", split="test")           # -> dict of metrics
    featpipe.report("models/latest")                            # -> Path of the run's report.html (rebuilt)
    featpipe.predict("clip.mp4", model="models/latest")        # a file, a folder or a list -> [Prediction]
    featpipe.zero_shot("clip.mp4", backbone="clip-b16", labels="cat,dog")  # no training -> [ZeroShotPrediction]
    featpipe.zero_shot_cache("cache/clip-b16.h5", split="test")  # its class names as labels -> accuracy
    featpipe.info("cache/inceptionv3.h5")                      # -> lines describing a cache or a run
    featpipe.linear_probe("cache/inceptionv3.h5")              # -> test metrics of the baseline heads must match

Keras is imported only when a function needs it.
"""

# The public API: one name per command, from the stage package that does the work
# (docs/python-api.md). Keras is not imported here.
from featpipe._version import __version__
from featpipe.cache.shards import merge_shards as merge
from featpipe.errors import FeatpipeError
from featpipe.extraction.extract import ExtractResult, extract
from featpipe.extraction.options import ExtractOptions
from featpipe.runs.evaluate import evaluate
from featpipe.runs.info import info
from featpipe.runs.predict import Prediction, predict
from featpipe.runs.report import write_report as report
from featpipe.runs.zeroshot import ZeroShotCacheResult, ZeroShotPrediction, zero_shot, zero_shot_cache
from featpipe.training.baselines import linear_probe
from featpipe.training.options import TrainOptions
from featpipe.training.search import TuneOptions
from featpipe.training.train import TrainResult, train
from featpipe.training.tune import TuneResult, tune

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
    "report",
    "predict",
    "Prediction",
    "zero_shot",
    "zero_shot_cache",
    "ZeroShotPrediction",
    "ZeroShotCacheResult",
    "info",
    "tune",
    "TuneOptions",
    "TuneResult",
    "linear_probe",
]
