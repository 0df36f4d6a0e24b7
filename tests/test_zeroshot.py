"""Zero-shot classification from label names (featpipe.runs.zeroshot, `featpipe zero-shot`).

Tests marked ``hub`` need keras-hub: their CLIP and SigLIP models are tiny random presets written by keras-hub's
own ``save_to_preset``, tokenizer included (a tiny byte-pair vocabulary for CLIP, a tiny SentencePiece model
trained here for SigLIP). The unmarked ones check the refusals a user without keras-hub sees.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import featpipe
from cli_args import cli
from featpipe.backbones.hub import INSTALL
from featpipe.errors import BackboneError, OptionError
from featpipe.runs.zeroshot import clip_embeddings, load_text_tower, score
from videos import write_video

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _said(result) -> str:
    return " ".join((result.output + (result.stderr or "")).split())


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Two classes, one short clip of noise each (6 frames, 48 px)."""
    root = tmp_path_factory.mktemp("zs") / "data"
    for name, seed in (("bird", 1), ("cat", 2)):
        noise = np.random.default_rng(seed).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
        write_video(root / name / f"{name}.mp4", 6, 48, 48, color_fn=noise.__getitem__)
    return root


# ------------------------------------------------------------------ without keras-hub (make test)


def test_zero_shot_without_keras_hub_is_one_sentence_naming_the_install(no_keras_hub, clips):
    result = cli("zero-shot", clips / "cat" / "cat.mp4", "--backbone", "clip-b16", "--labels", "cat,dog")
    assert result.exit_code == 2
    assert "needs keras-hub" in _said(result) and INSTALL in _said(result)
    with pytest.raises(BackboneError, match="needs keras-hub.*featpipe\\[hub\\]"):
        load_text_tower("siglip2-b16")


def test_a_template_without_braces_is_refused(clips):
    result = cli("zero-shot", clips, "--backbone", "clip-b16", "--labels", "cat,dog", "--template", "a video")
    assert result.exit_code == 2 and "--template must hold {} once, where each label goes" in _said(result)
    with pytest.raises(OptionError, match="must hold"):
        featpipe.zero_shot(clips, backbone="clip-b16", labels="cat,dog", template="{} and {}")


def test_a_backbone_without_a_text_tower_is_refused(clips):
    result = cli("zero-shot", clips, "--backbone", "vgg16", "--labels", "cat,dog")
    assert result.exit_code == 2
    assert "vgg16 has no text tower, so it cannot classify from label names" in _said(result)
    result = cli("zero-shot", clips, "--backbone", "dinov2-b14", "--labels", "cat,dog")
    assert result.exit_code == 2 and "dinov2-b14 has no text tower" in _said(result)
    assert "zero-shot needs a CLIP or SigLIP backbone (clip-b16, clip-l14, siglip2-b16, or hub:PRESET" in _said(result)


def test_weights_none_cannot_zero_shot_and_says_to_pass_a_preset_folder(clips):
    result = cli("zero-shot", clips, "--backbone", "clip-b16", "--weights", "none", "--labels", "cat,dog")
    assert result.exit_code == 2
    assert "--weights none cannot classify from label names" in _said(result)
    assert "pass --weights FOLDER, a keras-hub preset folder" in _said(result)


def test_labels_are_needed_with_clips_and_must_be_two_distinct_names(clips):
    missing = cli("zero-shot", clips, "--backbone", "clip-b16")
    assert missing.exit_code == 2 and "--labels is needed to classify clips" in _said(missing)
    twice = cli("zero-shot", clips, "--backbone", "clip-b16", "--labels", "cat, cat")
    assert twice.exit_code == 2 and "'cat' more than once" in _said(twice)
    one = cli("zero-shot", clips, "--backbone", "clip-b16", "--labels", "cat")
    assert one.exit_code == 2 and "at least two labels" in _said(one)


def test_clip_options_with_a_cache_and_clips_with_a_cache_are_refused(clips, tmp_path):
    result = cli("zero-shot", "--cache", tmp_path / "c.h5", "--frames", "4")
    assert result.exit_code == 2 and "--frames is for clips; a cache's backbone" in _said(result)
    result = cli("zero-shot", clips, "--cache", tmp_path / "c.h5")
    assert result.exit_code == 2 and "give either clips or --cache, not both" in _said(result)


def test_the_scoring_rules_are_cosine_softmax_and_siglips_sigmoid():
    """Frames are normalised before the mean (a long frame does not dominate), padded frames do not count."""
    features = np.array([[[10.0, 0.0], [0.0, 1.0], [0.0, 5.0]]])  # the third frame is padding
    mask = np.array([[True, True, False]])
    clip = clip_embeddings(features, mask)
    np.testing.assert_allclose(clip, [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)
    texts = np.array([[1.0, 1.0], [3.0, 0.0]])  # cosines 1 and sqrt(0.5)
    p = score(clip, texts, "softmax", scale=2.0)
    expected = np.exp([2.0, 2.0 * np.sqrt(0.5)])
    np.testing.assert_allclose(p[0], expected / expected.sum(), atol=1e-9)
    s = score(clip, texts, "sigmoid", scale=2.0, bias=-1.0)
    np.testing.assert_allclose(s[0], 1 / (1 + np.exp(-(2.0 * np.array([1.0, np.sqrt(0.5)]) - 1.0))), atol=1e-9)


# ------------------------------------------------------------------ with keras-hub (make test-hub)


def _clip_tokenizer(keras_hub):
    """A byte-pair tokenizer over lower-case letters (each alone and word-final), one merge, and CLIP's specials."""
    vocab = {"<|startoftext|>": 0}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["of</w>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id: CLIP's text pooler takes the end token's output
    return keras_hub.models.CLIPTokenizer(vocabulary=vocab, merges=["o f</w>"])


def _siglip_tokenizer(keras_hub):
    """A word-level SentencePiece model trained here on a few sentences (</s> ends and pads, as SigLIP's)."""
    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a photo of a cat", "a photo of a dog", "a video of a bird", "the quick brown fox"]),
        model_writer=proto, vocab_size=14, model_type="word", unk_id=0, bos_id=-1, eos_id=1, pad_id=2,
        unk_piece="<unk>", eos_piece="</s>", pad_piece="<pad>", minloglevel=2,
    )  # fmt: skip
    return keras_hub.models.SigLIPTokenizer(proto=proto.getvalue())


def _tiny_preset(folder: Path, family: str) -> Path:
    """A tiny random CLIP or SigLIP preset with its tokenizer, written by keras-hub's save_to_preset."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    models, layers = keras_hub.models, keras_hub.layers
    vit = dict(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3))
    if family == "clip":
        text = models.CLIPTextEncoder(64, 16, 16, 1, 2, 32, max_sequence_length=16)
        backbone = models.CLIPBackbone(models.CLIPVisionEncoder(**vit), text, projection_dim=12)
        converter = layers.CLIPImageConverter((32, 32), scale=1 / 255 / 0.27, offset=-0.45 / 0.27)
        tokenizer = _clip_tokenizer(keras_hub)
    else:
        text = models.SigLIPTextEncoder(16, 16, 16, 1, 2, 32, max_sequence_length=8)
        backbone = models.SigLIPBackbone(models.SigLIPVisionEncoder(**vit), text)
        converter = layers.SigLIPImageConverter((32, 32), scale=1 / 127.5, offset=-1.0, crop_to_aspect_ratio=False)
        tokenizer = _siglip_tokenizer(keras_hub)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    tokenizer.save_to_preset(str(folder))
    return folder


def _extract(data: Path, out: Path, backbone: str, *extra) -> Path:
    result = cli(
        "extract", "--data", data, "--output", out, "--backbone", backbone, "--frames", "4", "--dtype", "float32",
        "--val-fraction", "0", "--test-fraction", "0", "--quiet", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _json_lines(result) -> dict[str, dict]:
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(row["clip"]).name: row for row in rows}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return _tiny_preset(tmp_path_factory.mktemp("zsclip") / "tinyclip", "clip")


@pytest.mark.hub
def test_clips_and_their_cache_give_the_same_labels_and_probabilities(tiny_clip, clips, tmp_path):
    backbone = f"hub:{tiny_clip}"
    cache = _extract(clips, tmp_path / "c.h5", backbone)
    labels = "bird,cat,a red fox"
    direct = cli("zero-shot", clips, "--backbone", backbone, "--frames", "4", "--labels", labels, "--json")
    assert direct.exit_code == 0, _said(direct)
    cached = cli("zero-shot", "--cache", cache, "--split", "train", "--labels", labels, "--json")
    assert cached.exit_code == 0, _said(cached)
    direct_rows, cached_rows = _json_lines(direct), _json_lines(cached)
    assert sorted(direct_rows) == sorted(cached_rows) == ["bird.mp4", "cat.mp4"]
    for name, row in direct_rows.items():
        other = cached_rows[name]
        assert [t["label"] for t in row["top"]] == [t["label"] for t in other["top"]]
        np.testing.assert_allclose(
            [t["probability"] for t in row["top"]], [t["probability"] for t in other["top"]], atol=1e-4
        )
        # CLIP's rule: probabilities over the labels given, summing to 1, ranked best first
        probabilities = [t["probability"] for t in row["top"]]
        assert row["scoring"] == "softmax" and sorted(t["label"] for t in row["top"]) == sorted(labels.split(","))
        assert abs(sum(probabilities) - 1) < 1e-5 and probabilities == sorted(probabilities, reverse=True)
    # the cache against its own class names: accuracy, as evaluate reports it, and the same numbers from Python
    report = cli("zero-shot", "--cache", cache, "--split", "train")
    assert report.exit_code == 0, _said(report)
    assert "Labels: the cache's class names (bird, cat)." in _said(report) and "accuracy" in report.stdout.lower()
    metrics = json.loads(cli("zero-shot", "--cache", cache, "--split", "train", "--json").stdout)
    result = featpipe.zero_shot_cache(cache, split="train")
    assert metrics["n"] == 2 and metrics["accuracy"] == result.metrics["accuracy"]
    assert result.labels == ["bird", "cat"] and "macro_f1" in metrics
    right = sum(p.top[0][0] == Path(p.clip).parent.name for p in result.predictions)
    assert metrics["accuracy"] == right / 2


def _text_inputs(tower, family: str, texts: list[str]):
    """The input of the last linear layer of the text tower for ``texts``, and that layer."""
    import keras

    full = tower.backbone
    ids = tower.preprocessor({"prompts": texts, "images": None})["token_ids"]
    if family == "clip":
        return np.asarray(full.text_pooler(full.text_encoder({"token_ids": ids}), ids)), full.text_projection
    encoder = full.text_encoder
    return np.asarray(keras.Model(encoder.inputs, encoder.head.input)({"token_ids": ids})), encoder.head


@pytest.mark.hub
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_label_whose_text_embedding_is_the_clips_direction_wins_by_the_cosine_rule(family, clips, tmp_path):
    """The text tower's last linear layer is set so that 'cat' embeds exactly along the cat clip's embedding and
    'dog' at cosine 0.5 from it: the scores are then known numbers (scale 2, SigLIP bias -1)."""
    folder = _tiny_preset(tmp_path / family, family)
    cache = _extract(clips, tmp_path / "c.h5", f"hub:{folder}")
    with h5py.File(cache) as f:  # the cat clip's embedding, computed here from the cached frames
        videos = [Path(v).name for v in f["video"].asstr()[()]]
        row = videos.index("cat.mp4")
        feats, mask = f["features"][row], f["mask"][row].astype(bool)
    frames = feats[mask] / np.linalg.norm(feats[mask], axis=1, keepdims=True)
    e = frames.mean(axis=0) / np.linalg.norm(frames.mean(axis=0))
    u = np.random.default_rng(0).normal(size=e.shape)
    u -= (u @ e) * e
    u /= np.linalg.norm(u)
    targets = np.stack([e, 0.5 * e + np.sqrt(0.75) * u])  # cosines 1 and 0.5 with the clip
    template = "a photo of a {}"
    tower = load_text_tower(f"hub:{folder}")
    h, layer = _text_inputs(tower, family, [template.format("cat"), template.format("dog")])
    layer.kernel.assign(np.linalg.pinv(h) @ targets)  # h @ kernel == targets
    head = tower.backbone.clip_head if family == "clip" else tower.backbone.siglip_head
    head.logit_scale.assign(np.log(2.0))
    if family == "siglip":
        layer.bias.assign(np.zeros(layer.bias.shape))
        head.logit_bias.assign(-1.0)
    tower.backbone.save_to_preset(str(folder))  # the image side is unchanged: the cache still matches
    expected = (
        {"cat": 1 / (1 + np.exp(-1.0)), "dog": 1 / (1 + np.exp(1.0))}  # softmax of 2 * (1, 0.5)
        if family == "clip"
        else {"cat": 1 / (1 + np.exp(-1.0)), "dog": 0.5}  # sigmoid(2 * cos - 1), per label
    )
    for args in (["--cache", cache, "--split", "train"], [clips / "cat", "--backbone", f"hub:{folder}", "--frames", 4]):
        # the winner given last: the ranking is by score, not by the order of --labels
        result = cli("zero-shot", *args, "--labels", "dog,cat", "--template", template, "--json")
        assert result.exit_code == 0, _said(result)
        top = _json_lines(result)["cat.mp4"]["top"]
        assert [t["label"] for t in top] == ["cat", "dog"]
        np.testing.assert_allclose([t["probability"] for t in top], [expected["cat"], expected["dog"]], atol=1e-3)


@pytest.mark.hub
def test_a_bad_clip_among_good_ones_is_a_failed_row_and_the_others_are_scored(tiny_clip, clips, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").write_text("a file named like extract's default cache folder: zero-shot writes nothing")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    result = cli(
        "zero-shot", clips / "cat" / "cat.mp4", bad, clips / "bird" / "bird.mp4",
        "--backbone", f"hub:{tiny_clip}", "--frames", "4", "--labels", "cat,bird",
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "broken.mp4" in lines[1] and "failed:" in lines[1]
    assert "cat.mp4" in lines[0] and "%" in lines[0] and "bird.mp4" in lines[2] and "%" in lines[2]
    assert "1 of 3 clips could not be classified." in _said(result)


@pytest.mark.hub
def test_a_cache_without_a_text_tower_or_with_random_weights_is_refused(tiny_clip, clips, tmp_path):
    random = _extract(clips, tmp_path / "none.h5", f"hub:{tiny_clip}", "--weights", "none")
    result = cli("zero-shot", "--cache", random, "--split", "train")
    assert result.exit_code == 2 and "extracted with --weights none" in _said(result)
    cnn = _extract(clips, tmp_path / "vgg.h5", "vgg16", "--size", "32", "--weights", "none")
    result = cli("zero-shot", "--cache", cnn, "--split", "train", "--labels", "a,b")
    assert result.exit_code == 2 and "vgg16 has no text tower" in _said(result)
