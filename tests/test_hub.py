"""keras-hub foundation backbones: the hub extra, the named entries and local preset folders (hub:DIR).

Tests marked ``hub`` need keras-hub (``make test-hub`` installs the extra and runs them); the others run
in ``make test`` and must not: they check what a user without the extra sees, and what featpipe reads from
a preset folder's JSON alone. Every keras-hub model here is a tiny random one written by keras-hub's own
``save_to_preset``, except one full-size clip-b16 built offline with ``--weights none``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import featpipe
from cli_args import cli
from featpipe.backbones.frame_source import FeatureExtractor
from featpipe.backbones.hub import INSTALL, ImageConverterSpec
from featpipe.backbones.registry import REGISTRY, get_backbone
from featpipe.cache.reader import open_h5, read_config
from featpipe.errors import BackboneError, OptionError

HUB_NAMES = {"clip-b16": (224, 512), "clip-l14": (224, 768), "siglip2-b16": (224, 768), "dinov2-b14": (518, 768)}


def _clip_config(projection_dim: int = 12, image: int = 32) -> dict:
    """A CLIPBackbone config.json as save_to_preset writes it (tiny sizes)."""

    def layer(cls: str, **config) -> dict:
        return {"module": f"keras_hub.src.models.clip.{cls}", "class_name": cls, "config": config}

    vision = layer(
        "CLIPVisionEncoder",
        patch_size=8,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=32,
        intermediate_activation="quick_gelu",
        intermediate_output_index=None,
        image_shape=[image, image, 3],
    )
    text = layer("CLIPTextEncoder", vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2)
    return {
        "class_name": "CLIPBackbone",
        "config": {"vision_encoder": vision, "text_encoder": text, "projection_dim": projection_dim},
    }


# ------------------------------------------------------------------ without keras-hub (make test)


def test_a_hub_backbone_without_keras_hub_is_one_sentence_naming_the_install(no_keras_hub, two_clips, tmp_path):
    result = cli("extract", "--data", two_clips, "--output", tmp_path / "c.h5", "--backbone", "clip-b16")
    assert result.exit_code == 2
    message = " ".join((result.output + (result.stderr or "")).split())
    assert "clip-b16 needs keras-hub" in message and INSTALL in message
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(OptionError, match="needs keras-hub.*featpipe\\[hub\\]"):
        featpipe.ExtractOptions(data=two_clips, backbone="dinov2-b14")
    with pytest.raises(BackboneError, match="needs keras-hub.*featpipe\\[hub\\]"):  # predict builds it this way
        FeatureExtractor("siglip2-b16", weights="none")


@pytest.mark.parametrize("name", sorted(HUB_NAMES))
def test_named_hub_entries_carry_their_preset_size_feature_and_converter(name):
    entry = REGISTRY[name]
    size, dim = HUB_NAMES[name]
    assert (entry.default_size, entry.feature_dim, entry.extra) == (size, dim, "hub")
    # the preset's own normalisation: frames at the native size are only scaled and offset, per channel
    frames = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.float32)
    converter = entry.preprocess_input
    expected = frames * np.float32(converter.scale) + np.float32(converter.offset)
    np.testing.assert_allclose(entry.preprocess(frames.astype(np.uint8)), expected, rtol=1e-6, atol=1e-5)


def test_clip_and_dinov2_normalise_with_their_own_means_not_one_for_all():
    clip, dino, siglip = (REGISTRY[n].preprocess_input for n in ("clip-b16", "dinov2-b14", "siglip2-b16"))
    # a mid-grey pixel: CLIP's means (0.481, 0.458, 0.408), ImageNet's (0.485, 0.456, 0.406), SigLIP's 0.5
    grey = np.full((1, 4, 4, 3), 127.5, np.float32)
    for converter, mean, std in [
        (clip, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        (dino, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (siglip, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ]:
        out = np.asarray(ImageConverterSpec(converter.image_size[:1] * 2, converter.scale, converter.offset)(grey))
        np.testing.assert_allclose(out[0, 0, 0], (0.5 - np.array(mean)) / np.array(std), atol=1e-5)


def test_a_preset_folder_is_read_from_its_json_without_keras_hub(no_keras_hub, tmp_path):
    folder = tmp_path / "My Preset"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_clip_config(projection_dim=12, image=32)))
    with pytest.raises(BackboneError, match="no image_converter.json"):
        get_backbone(f"hub:{folder}")
    converter = {"config": {"image_size": [32, 32], "scale": 0.5, "offset": [-1, -2, -3], "interpolation": "bicubic"}}
    (folder / "image_converter.json").write_text(json.dumps(converter))
    entry = get_backbone(f"hub:{folder}")
    assert entry.name == f"hub:{folder.resolve()}" and entry.file_stem == "hub-My_Preset"
    assert (entry.default_size, entry.feature_dim, entry.default_weights) == (32, 12, str(folder.resolve()))
    assert entry.preprocess_input.scale == (0.5, 0.5, 0.5) and entry.preprocess_input.offset == (-1, -2, -3)


def test_hub_dir_that_is_not_a_preset_folder_is_one_sentence(tmp_path):
    with pytest.raises(BackboneError, match="not a folder"):
        get_backbone(f"hub:{tmp_path / 'missing'}")
    with pytest.raises(BackboneError, match="no config.json: it is not a keras-hub preset folder"):
        get_backbone(f"hub:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"class_name": "GemmaTokenizer", "config": {}}))
    with pytest.raises(BackboneError, match="is a GemmaTokenizer, not a keras-hub backbone"):
        get_backbone(f"hub:{tmp_path}")
    result = cli("extract", "--data", tmp_path, "--backbone", f"hub:{tmp_path / 'missing'}")
    assert result.exit_code == 2 and "not a folder" in result.output + (result.stderr or "")


# ------------------------------------------------------------------ with keras-hub (make test-hub)


def _tiny_preset(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny random preset of ``family`` written by keras-hub's save_to_preset (backbone and image converter)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    models, layers = keras_hub.models, keras_hub.layers
    vit = dict(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3))
    if family == "clip":
        text = models.CLIPTextEncoder(50, 16, 16, 1, 2, 32, max_sequence_length=8)
        backbone = models.CLIPBackbone(models.CLIPVisionEncoder(**vit), text, projection_dim=12)
        scale, offset = 1 / 255 / 0.27, -0.45 / 0.27
        converter = layers.CLIPImageConverter((32, 32), scale=scale, offset=offset, interpolation="bicubic")
    elif family == "siglip":
        text = models.SigLIPTextEncoder(50, 16, 16, 1, 2, 32, max_sequence_length=8)
        backbone = models.SigLIPBackbone(models.SigLIPVisionEncoder(**vit), text)
        converter = layers.SigLIPImageConverter((32, 32), scale=1 / 127.5, offset=-1.0, crop_to_aspect_ratio=False)
    else:
        dino = dict(vit, patch_size=7, image_shape=(28, 28, 3), position_embedding_shape=(28, 28))
        backbone = models.DINOV2Backbone(**dino)
        converter = layers.DINOV2ImageConverter((28, 28), scale=1 / 255 / 0.226, offset=-0.45 / 0.226)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def _reference_features(folder: Path, family: str, frames: np.ndarray) -> np.ndarray:
    """What keras-hub itself gives for these frames: its converter, then the family's embedding."""
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(folder))
    images = keras_hub.layers.ImageConverter.from_preset(str(folder))(frames.astype(np.float32))
    if family == "dinov2":
        return np.asarray(backbone({"images": images}))[:, 0, :]
    return np.asarray(backbone.get_vision_embeddings(images))


@pytest.mark.hub
@pytest.mark.parametrize("family, dim", [("clip", 12), ("siglip", 16), ("dinov2", 16)])
def test_a_preset_folder_gives_the_familys_own_embedding(family, dim, tmp_path):
    """CLIP: the joint-space image embedding; SigLIP: the pooled (joint-space) output; DINOv2: the CLS token."""
    folder = _tiny_preset(tmp_path / family, family)
    entry = get_backbone(f"hub:{folder}")
    extractor = FeatureExtractor(entry, weights="imagenet", batch_size=4)
    assert extractor.weights == str(folder.resolve()) and extractor.feature_shape == (dim,)
    size = entry.default_size
    frames = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    np.testing.assert_allclose(extractor(frames), _reference_features(folder, family, frames), atol=1e-4)
    # --weights none: the folder's architecture, deterministic random values; another seed, another network
    first, again = (FeatureExtractor(entry, weights="none", batch_size=4) for _ in range(2))
    other = FeatureExtractor(entry, weights="none", seed=1, batch_size=4)
    assert first.fingerprint == again.fingerprint != other.fingerprint != extractor.fingerprint
    np.testing.assert_array_equal(first(frames), again(frames))
    feats = first(frames)
    assert np.abs(feats[0] - feats[1]).max() > 1e-2 * np.abs(feats).max(), "random features must depend on the frame"


@pytest.mark.hub
def test_hub_dir_through_extract_train_evaluate_predict_and_predict_refuses_another_preset(tmp_path):
    from featpipe.video.sample_data import write_sample_data

    folder = _tiny_preset(tmp_path / "tinyclip", "clip")
    data = tmp_path / "data"
    write_sample_data(data, train=2, val=1, test=1)
    cache = tmp_path / "cache"
    result = cli("extract", "--data", data, "--cache-dir", cache, "--backbone", f"hub:{folder}", "--frames", "4")
    assert result.exit_code == 0, result.output
    path = cache / "hub-tinyclip.h5"  # a file name, not the folder's path
    config = read_config(path)  # the folder's path and a fingerprint of its weights
    assert (config.backbone, config.weights) == (f"hub:{folder.resolve()}", str(folder.resolve()))
    assert config.weights_fingerprint == FeatureExtractor(f"hub:{folder}").fingerprint
    assert tuple(config.feature_shape) == (12,)
    run_dir = featpipe.train(cache=path, rnn="gru", models_dir=tmp_path / "models", epochs=2, quiet=True).run_dir
    assert run_dir.parent == tmp_path / "models" and run_dir.name.startswith("hub-tinyclip-gru-")
    assert cli("evaluate", run_dir, "--split", "test").exit_code == 0
    clip = sorted((data / "test").rglob("*.mp4"))[0]
    predicted = cli("predict", clip, "--model", run_dir)
    assert predicted.exit_code == 0 and clip.name in predicted.output
    # the same folder with other weights (re-saved by keras-hub): predict refuses with a sentence
    _tiny_preset(folder, "clip", seed=7)
    refused = cli("predict", clip, "--model", run_dir)
    assert refused.exit_code == 2
    assert "not the ones the run was trained with" in " ".join((refused.output + (refused.stderr or "")).split())
    shutil.rmtree(folder)  # and a folder that is gone: a sentence naming it, not a traceback
    gone = cli("predict", clip, "--model", run_dir)
    assert gone.exit_code == 2 and "not on this machine" in " ".join((gone.output + (gone.stderr or "")).split())


@pytest.mark.hub
def test_a_named_backbone_refuses_a_preset_folder_of_another_architecture(tmp_path):
    folder = _tiny_preset(tmp_path / "tinyclip", "clip")
    with pytest.raises(BackboneError, match="another architecture.*hub:"):
        FeatureExtractor("clip-b16", weights=str(folder))
    dino = _tiny_preset(tmp_path / "tinydino", "dinov2")
    with pytest.raises(BackboneError, match="DINOV2Backbone, not the clip family"):
        FeatureExtractor("clip-b16", weights=str(dino))


@pytest.mark.hub
def test_clip_b16_with_weights_none_writes_512_d_features_offline(two_clips, tmp_path):
    """The one full-size model in the suite: ViT-B/16 at 224 px, built from featpipe's own hyper-parameters."""
    out = tmp_path / "clip.h5"
    result = cli(
        "extract", "--data", two_clips, "--output", out, "--backbone", "clip-b16", "--weights", "none",
        "--frames", "2", "--batch-size", "4", "--val-fraction", "0", "--test-fraction", "0", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open_h5(out) as f:
        features = f["features"][...]
    assert features.shape == (2, 2, 512) and np.isfinite(features).all()
    config = read_config(out)
    assert (config.backbone, config.weights, tuple(config.feature_shape)) == ("clip-b16", "none", (512,))


def test_hub_preset_names_and_folders_are_told_apart_and_named_for_files(tmp_path):
    from featpipe.backbones.hub import is_preset_name
    from featpipe.backbones.registry import file_stem

    assert is_preset_name("clip_vit_base_patch16") and is_preset_name("kaggle://keras/clip/keras/clip_b/2")
    assert not is_preset_name(str(tmp_path)) and not is_preset_name("./tiny") and not is_preset_name("~/presets/x")
    assert file_stem("hub:clip_vit_base_patch16") == "hub-clip_vit_base_patch16"
    assert file_stem("hub:kaggle://keras/clip/keras/clip_b/2") == "hub-keras-clip-keras-clip_b-2"


def test_hub_preset_name_without_keras_hub_names_the_install_command(no_keras_hub):
    with pytest.raises(BackboneError, match="needs keras-hub.*featpipe\\[hub\\]"):
        get_backbone("hub:clip_vit_base_patch16")


@pytest.mark.hub
def test_hub_preset_name_that_cannot_be_fetched_is_one_sentence():
    with pytest.raises(BackboneError, match="Could not fetch the keras-hub preset 'no_such_preset'.*hub:FOLDER"):
        get_backbone("hub:no_such_preset")


@pytest.mark.hub
def test_hub_preset_name_is_fetched_by_keras_hub_and_recorded_by_name(tmp_path, monkeypatch):
    """hub:NAME: keras-hub fetches the preset's files (here from a tiny folder standing in for its download
    cache, as there is no internet); the cache records the name and the weights' fingerprint."""
    from keras_hub.src.utils import preset_utils

    folder = _tiny_preset(tmp_path / "download", "clip")
    fetched, keras_hubs_own = [], preset_utils.get_file

    def get_file(preset, path):
        if preset != "tiny_clip_preset":  # a local folder: keras-hub's own
            return keras_hubs_own(preset, path)
        fetched.append(path)
        return str(folder / path)

    monkeypatch.setattr(preset_utils, "get_file", get_file)
    entry = get_backbone("hub:tiny_clip_preset")
    assert (entry.name, entry.file_stem, entry.feature_dim, entry.default_weights) == (
        "hub:tiny_clip_preset", "hub-tiny_clip_preset", 12, None,
    )  # fmt: skip
    extractor = FeatureExtractor(entry, batch_size=4)  # --weights imagenet: the preset's pretrained weights
    assert extractor.weights == "imagenet" and "model.weights.h5" in fetched
    assert extractor.fingerprint == FeatureExtractor(f"hub:{folder}", batch_size=4).fingerprint
    frames = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(extractor(frames), _reference_features(folder, "clip", frames), atol=1e-4)


@pytest.mark.hub
def test_another_keras_hub_image_backbone_gives_its_pooled_output(tmp_path):
    """hub:DIR of a family featpipe has no rule for (a tiny ResNet): its feature map averaged over space."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    folder = tmp_path / "tinyresnet"
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 6],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block", use_pre_activation=False,
        image_shape=(None, None, 3),
    )  # fmt: skip
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter((40, 40), scale=1 / 255, offset=-0.5).save_to_preset(str(folder))
    entry = get_backbone(f"hub:{folder}")
    assert (entry.default_size, entry.feature_dim) == (40, 6)
    extractor = FeatureExtractor(entry, batch_size=2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    maps = np.asarray(backbone(frames.astype(np.float32) / 255 - 0.5))
    assert maps.ndim == 4  # (B, H, W, C): the pooled feature is its spatial mean
    np.testing.assert_allclose(extractor(frames), maps.mean(axis=(1, 2)), atol=1e-4)
    again = FeatureExtractor(entry, weights="none", batch_size=2)
    assert again.fingerprint != extractor.fingerprint and again(frames).shape == (2, 6)


@pytest.mark.hub
@pytest.mark.parametrize("family", ["clip", "resnet"])
def test_mixed_precision_runs_hub_backbones_in_bfloat16_with_the_same_weights(family, tmp_path):
    import keras_hub

    if family == "clip":
        folder = _tiny_preset(tmp_path / family, "clip")
    else:
        folder = tmp_path / family
        keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
            stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block", use_pre_activation=False,
            image_shape=(None, None, 3),
        ).save_to_preset(str(folder))  # fmt: skip
        keras_hub.layers.ResNetImageConverter((32, 32), scale=1 / 255).save_to_preset(str(folder))
    full = FeatureExtractor(f"hub:{folder}", batch_size=2)
    mixed = FeatureExtractor(f"hub:{folder}", batch_size=2, precision="mixed_bfloat16")
    assert mixed.fingerprint == full.fingerprint  # the same weights, computed in bfloat16
    policies = {layer.dtype_policy.name for layer in mixed.model._flatten_layers() if layer.weights}
    assert "mixed_bfloat16" in policies
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a, b = full(frames), mixed(frames)
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


@pytest.mark.hub
@pytest.mark.parametrize("name", ["clip-l14", "siglip2-b16", "dinov2-b14"])
def test_the_other_named_architectures_build_offline_with_their_feature_size(name):
    """Built from featpipe's shipped hyper-parameters with --weights none (no forward pass: too slow here at
    full size; clip-b16 and videoprism-b run one)."""
    from featpipe.backbones.weights import build_model

    entry = REGISTRY[name]
    model = build_model(entry, entry.default_size, "none", 0)
    assert tuple(model.input.shape[1:]) == (entry.default_size, entry.default_size, 3)
    assert int(model.output.shape[-1]) == entry.feature_dim == HUB_NAMES[name][1]
