"""featpipe: frozen ImageNet CNN features for video clips, cached in HDF5, then fast sequence models."""

from featpipe.errors import FeatpipeError

__version__ = "0.1.0"

__all__ = ["FeatpipeError", "__version__"]
