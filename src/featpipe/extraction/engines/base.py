"""The engine interface: where ``extract()`` has the backbone run, behind one seam.

``extract()`` does everything an engine shares -- index, shard, resume, the lock, the cache's
config and fingerprint check, folding the journal into the HDF5 file, the result -- and asks the
engine, found by name in :data:`ENGINE_MODULES`, for three things only:

* :meth:`Engine.check` -- before any work, refuse in a sentence what cannot run here;
* :meth:`Engine.source` -- the frame source the driver records the cache with (a
  :class:`~featpipe.backbones.frame_source.FrameSource`; the local engine's also computes);
* :meth:`Engine.run` -- the clips still to do (a :class:`Work`) turned into finished clip
  records handed to the writer (a :class:`~featpipe.cache.writer.CacheWriter`, journal first),
  returning where the time went (:class:`~featpipe.extraction.stages.Stats`).

An engine is looked up lazily (by module path), so that importing featpipe or extracting
locally never imports an engine's optional dependency (Ray); an engine imports it in
:meth:`Engine.check` and :meth:`Engine.run`, and says how to install it when it is missing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

from featpipe.backbones.frame_source import FrameSource
from featpipe.backbones.registry import Backbone
from featpipe.cache.writer import CacheWriter
from featpipe.extraction.options import ExtractOptions
from featpipe.extraction.stages import Stats
from featpipe.video.records import Dataset, Record

# engine name (featpipe.names.ENGINES, --engine) -> the module whose ENGINE it is
ENGINE_MODULES: dict[str, str] = {
    "local": "featpipe.extraction.engines.local",
    "ray": "featpipe.extraction.engines.ray",
}


@dataclass
class Work:
    """What an engine is given to do: the clips, and what their records are made with."""

    todo: list[Record]  # clips to extract, in order
    dataset: Dataset  # the whole index (label numbers: dataset.label_index)
    source: FrameSource  # from Engine.source
    opts: ExtractOptions
    # the driver's weights fingerprint, the cache checked against it (CacheError if it differs): an engine
    # that starts writing before the source's fingerprint is known calls it before its first record
    fingerprint: Callable[[], str]


class Engine(Protocol):
    """Where the backbone runs (see the module's docstring)."""

    name: str

    def check(self) -> None:
        """Before any work: raise FeatpipeError (a sentence) if this engine cannot run here (its extra missing)."""

    def source(self, backbone: Backbone, size: int, opts: ExtractOptions) -> FrameSource:
        """The frame source for ``backbone`` at ``size`` with ``opts``' weights, seed, batch size and precision."""

    def run(self, work: Work, writer: CacheWriter) -> Stats:
        """Extract ``work.todo``, each clip's record handed to ``writer`` (a failed clip as a failed-clip record).

        Ctrl-C or an error: the clips already finished are written; at most those in flight are lost.
        """


def get_engine(name: str) -> Engine:
    """The engine registered as ``name`` (one of featpipe.names.ENGINES, checked by ExtractOptions)."""
    return importlib.import_module(ENGINE_MODULES[name]).ENGINE
