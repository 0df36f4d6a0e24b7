"""The video-native backbone: videoprism-b, hub:DIR VideoPrism folders, and chunks of K frames through embed().

A video-native backbone embeds K consecutive frames of one clip at once (``Backbone.clip_frames``). Tests
marked ``hub`` use a tiny random video-only VideoPrism preset (K=4, 32 px) that keras-hub's save_to_preset
writes, and one full-size videoprism-b chunk built offline with ``--weights none``; the others need no
keras-hub (a fake chunked frame source, the option check, a preset folder read from its JSON).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import featpipe
from cli_args import cli
from featpipe.backbones.registry import REGISTRY, get_backbone
from featpipe.cache.reader import open_h5, read_config
from featpipe.errors import BackboneError, OptionError
from featpipe.extraction.stages import Decoded, embed

K = 4  # frames per chunk of the tiny test preset


@dataclass
class Window:
    """What embed() reads of a decoded window: frames (T, H, W, 3) zero-padded after the real ones, and the mask."""

    frames: np.ndarray
    mask: np.ndarray


def _window(real: int, t: int, size: int = 32, seed: int = 0) -> Window:
    frames = np.zeros((t, size, size, 3), np.uint8)  # the cache's padding: zero frames after the real ones
    frames[:real] = np.random.default_rng(seed).integers(0, 256, (real, size, size, 3), dtype=np.uint8)
    return Window(frames, np.arange(t) < real)


def _message(result) -> str:
    return " ".join((result.output + (result.stderr or "")).split())


# ------------------------------------------------------------------ without keras-hub (make test)


class ChunkSource:
    """A chunked frame source that records each call: a frame's "feature" is its first pixel plus its
    position in its chunk, so a feature shows which frame it came from and that chunks start where they should."""

    def __init__(self, clip_frames: int, batch_size: int):
        self.clip_frames, self.batch_size, self.feature_shape = clip_frames, batch_size, (2,)
        self.calls: list[np.ndarray] = []

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        assert len(frames) % self.clip_frames == 0, "a call must hold whole chunks"
        self.calls.append(frames.copy())
        position = np.arange(len(frames)) % self.clip_frames
        return np.stack([frames[:, 0, 0, 0].astype(np.float32), position.astype(np.float32)], axis=1)


def test_embed_feeds_whole_chunks_of_one_clip_filled_with_the_last_real_frame_never_padding():
    source = ChunkSource(clip_frames=K, batch_size=2 * K)
    short = _window(2, 2 * K, size=4, seed=1)  # fewer real frames than one chunk
    longer = _window(K + 2, 2 * K, size=4, seed=2)  # a chunk and a bit
    done = {e.item: e for e in embed([Decoded("short", [short]), Decoded("longer", [longer])], source)}
    sent = np.concatenate(source.calls)
    assert len(sent) == 3 * K  # 2 real frames -> 1 chunk, 6 -> 2 chunks: nothing else, no zero frame
    chunks = sent.reshape(3, K, *sent.shape[1:])
    # every chunk is one clip's frames in order, its tail the last real frame repeated
    np.testing.assert_array_equal(chunks[0], short.frames[[0, 1, 1, 1]])
    np.testing.assert_array_equal(chunks[1], longer.frames[:K])
    np.testing.assert_array_equal(chunks[2], longer.frames[[4, 5, 5, 5]])
    for item, window in (("short", short), ("longer", longer)):
        features = done[item].features[0]
        real = int(window.mask.sum())
        np.testing.assert_array_equal(features[:real, 0], window.frames[:real, 0, 0, 0])
        np.testing.assert_array_equal(features[:real, 1], np.arange(real) % K)  # each frame at its chunk position
        assert not features[real:].any(), "masked positions store zeros, not the filler's features"


def test_an_image_backbone_still_gets_only_real_frames_batched_across_clips():
    source = ChunkSource(clip_frames=1, batch_size=4)
    windows = [_window(2, 5, size=4, seed=1), _window(3, 5, size=4, seed=2)]
    list(embed([Decoded(i, [w]) for i, w in enumerate(windows)], source))
    assert [len(c) for c in source.calls] == [4, 1]  # 5 real frames, batched across the two clips


def test_videoprism_b_carries_its_preset_size_chunk_and_its_converters_plain_scaling():
    entry = REGISTRY["videoprism-b"]
    assert (entry.default_size, entry.feature_dim, entry.clip_frames, entry.extra) == (288, 768, 16, "hub")
    converter = entry.preprocess_input
    assert (converter.image_size, converter.interpolation, converter.antialias) == ((288, 288), "bilinear", True)
    frames = np.random.default_rng(0).integers(0, 256, (2, 288, 288, 3), dtype=np.uint8)
    np.testing.assert_allclose(entry.preprocess(frames), frames / 255.0, atol=1e-6)  # [0, 1], no mean or std


def test_frames_not_a_multiple_of_the_chunk_is_refused_with_the_nearest_valid_values(two_clips, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # the check needs no keras-hub: it comes first
    assert REGISTRY["videoprism-b"].clip_frames == 16 and REGISTRY["clip-b16"].clip_frames == 1
    result = cli("extract", "--data", two_clips, "--output", tmp_path / "c.h5", "--backbone", "videoprism-b")
    assert result.exit_code == 2  # the default --frames 20
    assert "--frames must be a multiple of 16 for videoprism-b" in _message(result)
    assert "use 16 or 32" in _message(result) and not (tmp_path / "c.h5").exists()
    with pytest.raises(OptionError, match="multiple of 16 .* got 8: use 16 "):
        featpipe.ExtractOptions(data=two_clips, backbone="videoprism-b", frames=8)


def test_a_videoprism_folder_is_read_from_its_json_with_its_chunk_size(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    config = {"class_name": "VideoPrismBackbone", "config": {**_TINY, "image_shape": [32, 32, 3]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    converter = {"config": {"image_size": [32, 32], "scale": [1 / 255], "offset": None, "antialias": True}}
    (tmp_path / "image_converter.json").write_text(json.dumps(converter))
    entry = get_backbone(f"hub:{tmp_path}")
    assert (entry.clip_frames, entry.feature_dim, entry.default_size) == (K, 16, 32)
    with pytest.raises(OptionError, match="multiple of 4 .* got 6: use 4 or 8"):
        featpipe.ExtractOptions(data=tmp_path, backbone=f"hub:{tmp_path}", frames=6)
    config["config"]["num_text_layers"] = 2  # a video-text (lvt) preset: refused with a sentence
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="video-only VideoPrism preset"):
        get_backbone(f"hub:{tmp_path}")


# ------------------------------------------------------------------ with keras-hub (make test-hub)

_TINY = dict(
    num_frames=K,
    patch_size=8,
    hidden_dim=16,
    intermediate_dim=32,
    num_heads=2,
    num_spatial_layers=1,
    num_temporal_layers=1,
    num_auxiliary_layers=0,
)


def _tiny_videoprism(folder: Path, seed: int = 0) -> Path:
    """A tiny random video-only VideoPrism preset (K=4 frames of 32 px) written by keras-hub's save_to_preset."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.VideoPrismBackbone(**_TINY, image_shape=(32, 32, 3))
    converter = keras_hub.layers.VideoPrismImageConverter(
        (32, 32), scale=[1 / 255.0], offset=None, interpolation="bilinear", antialias=True
    )
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_videoprism(tmp_path_factory) -> Path:
    return _tiny_videoprism(tmp_path_factory.mktemp("vp") / "tinyprism")


@pytest.mark.hub
def test_a_videoprism_folder_gives_each_frames_patch_mean_of_keras_hubs_own_output(tiny_videoprism):
    import keras_hub

    from featpipe.backbones.frame_source import FeatureExtractor

    extractor = FeatureExtractor(f"hub:{tiny_videoprism}", batch_size=6)  # rounded up to whole chunks
    assert (extractor.clip_frames, extractor.batch_size, extractor.feature_shape) == (K, 8, (16,))
    frames = np.random.default_rng(0).integers(0, 256, (2 * K, 32, 32, 3), dtype=np.uint8)
    backbone = keras_hub.models.Backbone.from_preset(str(tiny_videoprism))
    images = keras_hub.layers.ImageConverter.from_preset(str(tiny_videoprism))(frames.astype(np.float32))
    tokens = np.asarray(backbone(np.reshape(np.asarray(images), (2, K, 32, 32, 3))))  # (chunks, K, patches, 16)
    np.testing.assert_allclose(extractor(frames), tokens.mean(axis=2).reshape(2 * K, 16), atol=1e-4)
    # --weights none: the folder's architecture, deterministic random values, features that depend on the frame
    first, again = (FeatureExtractor(f"hub:{tiny_videoprism}", weights="none", batch_size=K) for _ in range(2))
    assert first.fingerprint == again.fingerprint != extractor.fingerprint
    feats = first(frames[:K])
    np.testing.assert_array_equal(feats, again(frames[:K]))
    assert np.abs(feats[0] - feats[1]).max() > 1e-2 * np.abs(feats).max()


@pytest.mark.hub
def test_padding_does_not_leak_into_real_frames_features(tiny_videoprism):
    from featpipe.backbones.frame_source import FeatureExtractor

    extractor = FeatureExtractor(f"hub:{tiny_videoprism}", batch_size=2 * K)
    short, longer = _window(2, K, seed=1), _window(K + 2, 2 * K, seed=2)  # --frames K and --frames 2K
    done = {e.item: e.features[0] for e in embed([Decoded("short", [short]), Decoded("longer", [longer])], extractor)}
    # the real frames' features are those of the same frames fed as full chunks, the last frame repeated ...
    np.testing.assert_allclose(done["short"][:2], extractor(short.frames[[0, 1, 1, 1]])[:2], atol=1e-5)
    np.testing.assert_allclose(done["longer"][:K], extractor(longer.frames[:K]), atol=1e-5)
    np.testing.assert_allclose(done["longer"][K : K + 2], extractor(longer.frames[[4, 5, 5, 5]])[:2], atol=1e-5)
    # ... not those the model gives with the zero padding frames in the chunk (so this test can fail)
    zero_padded = extractor(short.frames[:K])[:2]
    assert np.abs(done["short"][:2] - zero_padded).max() > 1e-3
    assert not done["short"][2:].any() and not done["longer"][K + 2 :].any()  # masked positions: zeros


@pytest.mark.hub
def test_the_ray_engines_actor_and_driver_feed_the_same_chunks_as_the_local_engine(tiny_videoprism):
    """The Ray engine's embedding UDF, run here without Ray: it goes through embed() like the local engine."""
    from featpipe.backbones.frame_source import FeatureExtractor
    from featpipe.extraction.engines.ray import ClipEmbedder, DriverBackbone

    entry = get_backbone(f"hub:{tiny_videoprism}")
    windows = [_window(2, 2 * K, seed=1), _window(K + 2, 2 * K, seed=2)]
    n = len(windows)
    batch = {
        "key": np.array(["a", "b"]), "label": np.array([0, 1]), "split": np.array(["train", "train"]),
        "frames": np.stack([w.frames for w in windows]), "mask": np.stack([w.mask for w in windows]),
        "n_frames": np.array([2, K + 2]), "damaged_from": np.full(n, -1), "time": np.zeros((n, 2 * K), np.float32),
        "duration": np.ones(n, np.float32), "fps": np.ones(n, np.float32), "error": np.array(["", ""], dtype=object),
    }  # fmt: skip
    rows = ClipEmbedder(entry, 32, str(tiny_videoprism), 0, 6, "float32", "float32")(batch)
    assert not rows["fatal"][0], rows["fatal"][0]
    local = FeatureExtractor(entry, batch_size=2 * K)
    expected = [
        e.features[0]
        for e in sorted(embed([Decoded(i, [w]) for i, w in enumerate(windows)], local), key=lambda e: e.item)
    ]
    np.testing.assert_allclose(rows["features"], np.stack(expected), atol=1e-5)
    driver = DriverBackbone(entry, 32, "imagenet", 0, 6, "float32")
    assert (driver.clip_frames, driver.batch_size, driver.wait()) == (K, 2 * K, local.fingerprint)


@pytest.mark.hub
def test_videoprism_dir_through_extract_train_evaluate_and_predict_windows_and_timeline(tiny_videoprism, tmp_path):
    from featpipe.video.sample_data import write_sample_data

    data = tmp_path / "data"
    write_sample_data(data, train=2, val=1, test=1)
    cache = tmp_path / "cache"
    backbone = f"hub:{tiny_videoprism}"
    refused = cli("extract", "--data", data, "--cache-dir", cache, "--backbone", backbone, "--frames", "6")
    assert refused.exit_code == 2 and "use 4 or 8" in _message(refused)
    result = cli("extract", "--data", data, "--cache-dir", cache, "--backbone", backbone, "--frames", "8")
    assert result.exit_code == 0, result.output
    path = cache / "hub-tinyprism.h5"
    config = read_config(path)
    assert config.backbone == f"hub:{tiny_videoprism.resolve()}" and tuple(config.feature_shape) == (16,)
    with open_h5(path) as f:
        features, mask = f["features"][...], f["mask"][...]
    assert features.shape[1:] == (8, 16) and np.isfinite(features).all()
    assert not features[~mask].any() and np.abs(features[mask]).max() > 0
    run_dir = featpipe.train(cache=path, rnn="gru", models_dir=tmp_path / "models", epochs=2, quiet=True).run_dir
    assert cli("evaluate", run_dir, "--split", "test").exit_code == 0
    clip = sorted((data / "test").rglob("*.mp4"))[0]
    for extra in ((), ("--windows", "2"), ("--timeline", "1")):
        predicted = cli("predict", clip, "--model", run_dir, *extra)
        assert predicted.exit_code == 0 and clip.name in predicted.output, predicted.output


@pytest.mark.hub
def test_videoprism_b_with_weights_none_gives_768_d_features_per_frame_of_a_16_frame_chunk():
    """The full-size model (114 M parameters, 16 frames of 288 px per chunk), built from featpipe's own
    hyper-parameters with no download: one chunk (about 50 s on 2 CPU cores)."""
    from featpipe.backbones.frame_source import FeatureExtractor

    extractor = FeatureExtractor("videoprism-b", weights="none", batch_size=16)
    assert (extractor.size, extractor.clip_frames, extractor.feature_shape) == (288, 16, (768,))
    frames = np.random.default_rng(0).integers(0, 256, (16, 288, 288, 3), dtype=np.uint8)
    features = extractor(frames)
    assert features.shape == (16, 768) and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-2 * np.abs(features).max(), "features depend on the frame"
