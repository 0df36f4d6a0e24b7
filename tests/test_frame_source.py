"""featpipe.backbones.frame_source: one protocol for every frame source, and the factory that picks one."""

from __future__ import annotations

import numpy as np

from featpipe.backbones.frame_source import FeatureExtractor, FrameSource, RawFrames, frame_source
from featpipe.backbones.registry import get_backbone
from featpipe.extraction.engines.ray import DriverBackbone


def test_the_factory_gives_the_raw_entry_its_frames_and_a_network_to_the_rest():
    raw = frame_source("raw", 16, batch_size=4)
    assert type(raw) is RawFrames and not isinstance(raw, FeatureExtractor)
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(raw(frames), frames)
    net = frame_source("vgg16", 32, "none", batch_size=4)
    assert type(net) is FeatureExtractor and net(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 512)
    assert type(FeatureExtractor("raw", 16)) is RawFrames, "the old spelling still gives the frames"


def test_every_frame_source_satisfies_the_protocol_and_knows_its_fingerprint():
    sources = [
        frame_source("raw", 16),
        frame_source("vgg16", 32, "none", batch_size=2),
        DriverBackbone(get_backbone("raw"), 16, "none", 0, None, "float32"),
    ]
    for source in sources:
        assert isinstance(source, FrameSource), type(source).__name__
        assert source.wait() == source.fingerprint and source.batch_size >= 1
