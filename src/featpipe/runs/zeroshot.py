"""`featpipe zero-shot`: classify clips from label names alone, with the text tower of a CLIP or SigLIP backbone.

No training: each label becomes a prompt through a template (default ``"a photo of a {}."``, the prompt of the
CLIP paper's zero-shot image classification), the backbone's own tokenizer and text tower embed it, and a clip
is scored by its mean frame embedding:

* the clip embedding is the mean over the clip's real frames (its mask) of the L2-normalised frame embeddings,
  normalised again; each label's text embedding is L2-normalised; their dot product is the cosine;
* CLIP: ``softmax(logit_scale * cos)`` over the labels given (probabilities that sum to 1);
* SigLIP: its own rule, ``sigmoid(logit_scale * cos + logit_bias)`` per label: independent scores in (0, 1)
  that do NOT sum to 1 (labels are ranked by them).

``logit_scale`` (stored as its log, used as ``exp``) and SigLIP's ``logit_bias`` are the trained values in
keras-hub's ``CLIPHead`` / ``SigLIPHead``. The frame embeddings are what a cache of these backbones holds
(:mod:`featpipe.backbones.hub`): CLIP's projected image embedding, SigLIP's pooled output, both in the joint
image-text space, so a cache is scored as it is, and clips are embedded the way `extract` embeds them.

The text tower comes from the same preset as the image features: the named backbone's keras-hub preset
(downloaded once by keras-hub), a preset folder given as ``--weights FOLDER``, or the ``hub:DIR`` folder.
``--weights none`` has no text tower to speak of (random weights and no tokenizer vocabulary) and is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from featpipe.backbones.hub import HubModel, import_keras_hub
from featpipe.backbones.registry import WEIGHTS_IMAGENET, WEIGHTS_NONE, Backbone, get_backbone
from featpipe.errors import BackboneError, CacheError, FeatpipeError, OptionError
from featpipe.options import check_int
from featpipe.runs.predict import MAX_BATCH, ClipList, Prediction, find_clips

DEFAULT_TEMPLATE = "a photo of a {}."  # the CLIP paper's prompt for zero-shot image classification
TEXT_FAMILIES = {"clip": "CLIPBackbone", "siglip": "SigLIPBackbone"}
SCORING = {"clip": "softmax", "siglip": "sigmoid"}
MAX_LABELS = 10_000


# ------------------------------------------------------------------------ options


def parse_labels(labels: str | Sequence[str] | None, name: str = "labels") -> list[str] | None:
    """``"a,b,c"`` or a list of names -> the names, stripped; at least two, none empty, none twice."""
    if labels is None:
        return None
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    if not all(isinstance(item, str) for item in items):
        raise OptionError(name, f"must be label names separated by commas, got {labels!r}.")
    names = [item.strip() for item in items]
    if any(not n for n in names):
        raise OptionError(name, f"has an empty label in {labels!r}; separate label names by single commas.")
    if len(names) < 2:
        raise OptionError(name, f"needs at least two labels to choose between, separated by commas, got {labels!r}.")
    if len(names) > MAX_LABELS:
        raise OptionError(name, f"takes at most {MAX_LABELS} labels, got {len(names)}.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OptionError(name, f"names {', '.join(repr(n) for n in twice)} more than once; give each label once.")
    return names


def check_template(template: str) -> str:
    """A prompt template with one ``{}`` where the label goes."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise OptionError(
            "template",
            f'must hold {{}} once, where each label goes (e.g. "a video of {{}}"), got {template!r}.',
        )
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError):
        raise OptionError(
            "template", f"may hold no braces but the one {{}} (write {{{{ and }}}} for others), got {template!r}."
        ) from None
    return template


def prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The text each label is embedded as: the template with the label in place of ``{}``."""
    check_template(template)
    return [template.format(label) for label in labels]


def text_family(backbone: Backbone | str) -> HubModel:
    """The keras-hub model of a backbone with a text tower (CLIP, SigLIP), or a BackboneError saying it has none."""
    entry = get_backbone(backbone) if isinstance(backbone, str) else backbone
    model = _text_model(entry)
    if model is None:
        raise BackboneError(
            f"{entry.name} has no text tower, so it cannot classify from label names; zero-shot needs a CLIP or "
            f"SigLIP backbone ({', '.join(text_backbones())}, or hub:PRESET of a CLIPBackbone or SigLIPBackbone)."
        )
    return model


def text_backbones() -> list[str]:
    """The registry's named backbones with a text tower."""
    from featpipe.backbones.registry import REGISTRY

    return [name for name, entry in REGISTRY.items() if _text_model(entry) is not None]


def _text_model(entry: Backbone) -> HubModel | None:
    model = getattr(entry.load, "__self__", None)
    return model if isinstance(model, HubModel) and model.family in TEXT_FAMILIES else None


def check_weights(weights: str, entry: Backbone) -> str:
    """The preset or folder the text tower is read from; ``none`` is refused."""
    from featpipe.backbones.weights import weights_label

    label = weights_label(weights, entry)
    if label == WEIGHTS_NONE:
        raise BackboneError(
            "--weights none cannot classify from label names: its text tower is random and there is no tokenizer "
            "vocabulary offline; pass --weights FOLDER, a keras-hub preset folder holding the text tower and "
            "its tokenizer (or leave --weights out to use the downloaded preset)."
        )
    return label


# ------------------------------------------------------------------------ scoring (NumPy only)


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def clip_embeddings(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, T, D) frame embeddings and (n, T) masks -> (n, D): the mean of the real frames' L2-normalised
    embeddings, L2-normalised again."""
    feats = _normalise(np.asarray(features, np.float32))
    weights = np.asarray(mask, np.float32)[..., None]
    mean = (feats * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
    return _normalise(mean)


def score(clips: np.ndarray, texts: np.ndarray, scoring: str, scale: float, bias: float = 0.0) -> np.ndarray:
    """(n, D) clip embeddings and (L, D) text embeddings -> (n, L) scores: ``softmax`` over the labels of
    ``scale * cos``, or ``sigmoid(scale * cos + bias)`` per label."""
    cos = _normalise(np.asarray(clips, np.float64)) @ _normalise(np.asarray(texts, np.float64)).T
    logits = scale * cos
    if scoring == "softmax":
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-(logits + bias)))
    raise ValueError(f"unknown scoring {scoring!r}")


# ------------------------------------------------------------------------ the text tower


@dataclass
class TextTower:
    """A CLIP or SigLIP text tower with its tokenizer, and the model's scoring rule and constants."""

    family: str
    source: str  # the preset name or folder it was read from
    scale: float  # exp(logit_scale)
    bias: float  # SigLIP's logit_bias (0 for CLIP)
    backbone: object = field(repr=False)  # the keras-hub CLIPBackbone / SigLIPBackbone
    preprocessor: object = field(repr=False)  # keras-hub's CLIPPreprocessor / SigLIPPreprocessor (text only)

    @property
    def scoring(self) -> str:
        return SCORING[self.family]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) L2-normalised text embeddings."""
        token_ids = self.preprocessor({"prompts": list(texts), "images": None})["token_ids"]
        out = self.backbone.get_text_embeddings(token_ids)
        return _normalise(np.asarray(out, np.float32))

    def scores(self, clips: np.ndarray, texts: np.ndarray) -> np.ndarray:
        return score(clips, texts, self.scoring, self.scale, self.bias)


def load_text_tower(backbone: Backbone | str, weights: str = WEIGHTS_IMAGENET) -> TextTower:
    """The text tower matching ``backbone`` with ``weights`` (its preset, or a preset folder)."""
    entry = get_backbone(backbone) if isinstance(backbone, str) else backbone
    model = text_family(entry)
    source = check_weights(weights, entry)
    if source == WEIGHTS_IMAGENET:
        source = model.preset
    keras_hub = import_keras_hub(f"Zero-shot with {entry.name}")
    try:
        full = keras_hub.models.Backbone.from_preset(source)
    except Exception as exc:  # keras-hub raises plain exceptions for a failed download or a bad folder
        raise BackboneError(
            f"Could not load the keras-hub preset '{source}' ({exc}). Without internet, copy the preset's folder "
            "here and pass --weights FOLDER."
        ) from exc
    if type(full).__name__ != TEXT_FAMILIES[model.family]:
        raise BackboneError(
            f"The preset '{source}' is a {type(full).__name__}, not the {TEXT_FAMILIES[model.family]} that "
            f"{entry.name} needs."
        )
    try:
        tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(source)
    except Exception as exc:
        raise BackboneError(
            f"The preset '{source}' has no tokenizer that keras-hub can load ({exc}); zero-shot needs the text "
            "tower's tokenizer: use the preset folder as keras-hub downloads it (tokenizer.json and its assets)."
        ) from exc
    length = int(full.text_encoder.max_sequence_length)
    if model.family == "clip":
        preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, sequence_length=length)
        head, bias = full.clip_head, 0.0
    else:
        preprocessor = keras_hub.models.SigLIPPreprocessor(tokenizer, sequence_length=length)
        head = full.siglip_head
        bias = float(np.asarray(head.logit_bias))
    scale = float(np.exp(np.asarray(head.logit_scale, np.float64)))
    return TextTower(model.family, str(source), scale, bias, full, preprocessor)


# ------------------------------------------------------------------------ results


@dataclass
class ZeroShotPrediction(Prediction):
    """A clip's labels ranked by score; ``scoring`` says whether they are softmax probabilities (CLIP, summing
    to 1 over the labels) or SigLIP's independent sigmoid scores."""

    scoring: str = "softmax"

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.ok:
            out["scoring"] = self.scoring
        return out


def _ranked(clip: str, p: np.ndarray, labels: Sequence[str], scoring: str) -> ZeroShotPrediction:
    order = np.argsort(-p, kind="stable")
    return ZeroShotPrediction(clip, [(labels[i], float(p[i])) for i in order], None, p, 1, scoring=scoring)


def _check_batch(batch_size: int | None) -> None:
    check_int("batch_size", batch_size, 1, MAX_BATCH, optional=True)


# ------------------------------------------------------------------------ clips


def zero_shot(
    clips: str | Path | Iterable[str | Path] | ClipList,
    backbone: str,
    labels: str | Sequence[str],
    weights: str = WEIGHTS_IMAGENET,
    template: str = DEFAULT_TEMPLATE,
    frames: int | None = None,
    sampling: str | None = None,
    fps: float | None = None,
    decoder: str | None = None,
    size: int | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    workers: int | None = None,
) -> list[ZeroShotPrediction]:
    """Rank ``labels`` for each clip with a CLIP or SigLIP backbone's text tower; no training.

    Clips are decoded and embedded as `featpipe extract` would (``frames``, ``sampling``, ``fps``, ``decoder``,
    ``size``, ``precision`` take extract's defaults), the frames batched across clips. A clip that cannot be
    decoded gets ``error`` set; the others are scored. See the module's text for the scoring rule.
    """
    from featpipe.backbones.frame_source import frame_source
    from featpipe.extraction.options import ExtractOptions
    from featpipe.extraction.stages import decode, embed
    from featpipe.runtime.devices import default_workers
    from featpipe.video.decode import read_windows  # lazy: no OpenCV on `import featpipe`
    from featpipe.video.plan import parse_sampling

    check_template(template)
    names = parse_labels(labels)
    if names is None:
        raise OptionError("labels", 'is needed to classify clips: give the label names, e.g. --labels "cat,dog".')
    entry = get_backbone(backbone)
    text_family(entry)  # these two refusals need no keras-hub
    check_weights(weights, entry)
    given = dict(frames=frames, sampling=sampling, fps=fps, decoder=decoder, size=size, precision=precision)
    opts = ExtractOptions(  # cache_dir ".": nothing is written, so a file named "cache" here is no concern
        backbone=backbone, weights=weights, batch_size=batch_size, workers=workers, cache_dir=".",
        **{k: v for k, v in given.items() if v is not None},
    )  # fmt: skip
    found = find_clips(clips)
    tower = load_text_tower(entry, opts.weights)
    texts = tower.embed(prompts(names, template))
    size = opts.size or entry.default_size
    extractor = frame_source(entry, size, opts.weights, opts.seed, opts.batch_size or 32, opts.precision)
    mode, rate = parse_sampling(opts.sampling_label)

    def read(item):
        return read_windows(item[1], opts.frames, size, mode, 1, fps=rate, decoder=opts.decoder)

    results: dict[int, ZeroShotPrediction] = {}
    todo = []
    for i, (path, error) in enumerate(found.entries):
        if error is None:
            todo.append((i, path))
        else:
            results[i] = ZeroShotPrediction(str(path), error=error)
    for done in embed(decode(todo, read, opts.workers or default_workers()), extractor):
        i, path = done.item
        if not done.ok:
            results[i] = ZeroShotPrediction(str(path), error=done.error)
            continue
        window = done.windows[0]
        p = tower.scores(clip_embeddings(done.features[:1], window.mask[None]), texts)[0]
        results[i] = _ranked(str(path), p, names, tower.scoring)
        results[i].duration = float(window.duration)
    return [results[i] for i in range(len(found.entries))]


# ------------------------------------------------------------------------ a cache


@dataclass
class ZeroShotCacheResult:
    """Zero-shot scores of a cache's clips: ``predictions`` per clip (in cache order), and ``metrics``
    (:func:`featpipe.runs.metrics.compute_metrics`' dict) when the labels are the cache's class names."""

    cache: str
    split: str
    labels: list[str]
    template: str
    scoring: str
    predictions: list[ZeroShotPrediction]
    metrics: dict | None


def zero_shot_cache(
    cache: str | Path,
    split: str = "test",
    labels: str | Sequence[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> ZeroShotCacheResult:
    """Score ``split`` of a CLIP or SigLIP cache against its own class names (or ``labels``); no training.

    The text tower is the one of the cache's backbone and weights (recorded in the cache); a text tower whose
    image side differs from the features' (another weights fingerprint) is refused. When the labels are the
    class names (the default, in any order), ``metrics`` holds accuracy, macro F1 ... as `evaluate` reports them.
    """
    from featpipe.backbones.frame_source import frame_source
    from featpipe.runs.metrics import compute_metrics  # lazy: scikit-learn
    from featpipe.training.inputs import check_finite, load_rows, open_index

    check_template(template)
    names = parse_labels(labels)
    path = Path(cache)
    with open_index(path) as index:
        config = index.config
        entry = get_backbone(config.backbone)
        text_family(entry)
        if config.weights == WEIGHTS_NONE:
            raise BackboneError(
                f"The cache '{path}' was extracted with --weights none: its random network has no text tower to "
                "classify from label names; extract with a preset's weights (or --weights FOLDER) to zero-shot."
            )
        rows = index.rows(split)
        if not len(rows):
            present = ", ".join(sorted(set(index.splits.tolist())))
            raise FeatpipeError(f"The cache '{path}' has no clips in the '{split}' split (splits present: {present}).")
        class_names = list(index.class_names)
        names = names or class_names
        weights = config.weights
        if weights != WEIGHTS_IMAGENET and not Path(weights).exists():
            raise BackboneError(
                f"The cache was extracted with the preset folder '{weights}', which is not on this machine; copy it "
                "to that path (its text tower is read from it)."
            )
        tower = load_text_tower(entry, weights)
        vision = frame_source(entry, config.input_size, weights, 0, 1)
        if vision.fingerprint != config.weights_fingerprint:
            raise CacheError(
                f"The {entry.name} weights here (fingerprint {vision.fingerprint}) are not the ones the cache "
                f"'{path}' was extracted with ({config.weights_fingerprint}); use the same preset or folder."
            )
        texts = tower.embed(prompts(names, template))
        check_finite(index, rows)
        scores = []
        for start in range(0, len(rows), 512):
            x, _ = load_rows(index, rows[start : start + 512])
            scores.append(tower.scores(clip_embeddings(x["features"], x["mask"]), texts))
        p = np.concatenate(scores)
        videos, truth = index.videos[rows], index.labels[rows]
    predictions = [_ranked(str(v), row, names, tower.scoring) for v, row in zip(videos, p)]
    metrics = None
    if sorted(names) == sorted(class_names):  # the class names, perhaps in another order: score them
        columns = [names.index(c) for c in class_names]
        metrics = compute_metrics(truth, p[:, columns], class_names)
        metrics.update(split=split, cache=str(path), scoring=tower.scoring, template=template)
    return ZeroShotCacheResult(str(path), split, names, template, tower.scoring, predictions, metrics)


def format_table(predictions: Sequence[ZeroShotPrediction]) -> str:
    """Each clip and its labels ranked, with their probabilities (CLIP) or sigmoid scores (SigLIP)."""
    from featpipe.runs.predict import format_table as predict_table

    return predict_table(predictions)


def to_json_lines(predictions: Sequence[ZeroShotPrediction]) -> str:
    return "\n".join(json.dumps(p.to_dict(), ensure_ascii=False) for p in predictions)
