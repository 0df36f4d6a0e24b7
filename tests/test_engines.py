"""featpipe.extraction.engines: extract() finds its engine by name and hands it the clips to do and a writer."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np

from featpipe.backbones.frame_source import frame_source
from featpipe.cache.schema import ClipRecord
from featpipe.extraction.engines import base
from featpipe.extraction.extract import extract
from featpipe.extraction.stages import Stats
from featpipe.names import ENGINES
from featpipe.video.sample_data import write_sample_data


class StampEngine:
    """An engine that runs no backbone: every clip's 'frames' are the value 7, so the cache shows who wrote it."""

    name = "local"

    def __init__(self):
        self.given: list[str] = []

    def check(self) -> None:
        pass

    def source(self, backbone, size, opts):
        return frame_source(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)

    def run(self, work: base.Work, writer) -> Stats:
        stats = Stats()
        work.fingerprint()  # before the first record, as the interface asks
        t, size = work.opts.frames, work.source.size
        for rec in work.todo:
            self.given.append(rec.video)
            feats = np.full((t, size, size, 3), 7, np.uint8)
            writer.append(
                ClipRecord(rec.video, work.dataset.label_index(rec.label), rec.split, t, feats, np.ones(t, bool))
            )
            stats.clips += 1
        return stats


ENGINE = StampEngine()


def test_every_engine_name_is_registered_and_names_itself():
    assert set(base.ENGINE_MODULES) == set(ENGINES)
    for name in ENGINES:
        assert base.get_engine(name).name == name


def test_extract_runs_the_engine_registered_under_the_options_name(tmp_path, monkeypatch):
    data = write_sample_data(tmp_path / "data", train=1, val=0, test=0, seed=0).root
    monkeypatch.setitem(base.ENGINE_MODULES, "local", __name__)
    ENGINE.given.clear()
    out = tmp_path / "c.h5"
    result = extract(data=data, output=out, backbone="raw", size=16, frames=4, quiet=True)
    assert len(set(ENGINE.given)) == len(ENGINE.given) == result.n_new > 0, "each clip to do, once"
    with h5py.File(out, "r") as f:
        assert sorted(f["video"].asstr()[:]) == sorted(ENGINE.given)
        assert (f["features"][:] == 7).all(), "what the engine handed the writer is what the cache holds"
    again = extract(data=data, output=out, backbone="raw", size=16, frames=4, quiet=True)
    assert again.n_new == 0 and again.n_skipped == result.n_new, "resume is extract's, whatever the engine"


def test_importing_featpipe_and_the_engines_never_imports_ray():
    code = (
        "import sys, featpipe, featpipe.extraction.extract, featpipe.extraction.engines.ray; "
        "from featpipe.extraction.engines.base import get_engine; get_engine('local'); get_engine('ray'); "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
