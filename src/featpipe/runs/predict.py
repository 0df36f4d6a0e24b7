"""`featpipe predict`: classify new clips with a trained run, with exactly the run's preprocessing.

Decoding, sampling, crop, size, backbone and weights all come from the run directory (which
copied them from the cache), never from flags. The backbone and the head are built once per
call; clips are decoded in worker threads and their frames batched through the backbone
together, like `featpipe extract`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from featpipe.backbones.frame_source import frame_source
from featpipe.backbones.registry import WEIGHTS_IMAGENET, WEIGHTS_NONE
from featpipe.errors import BackboneError, FeatpipeError, OptionError
from featpipe.extraction.stages import Decoded, decode, embed
from featpipe.names import DECODERS, PRECISIONS
from featpipe.options import (
    as_paths,
    check_choice,
    check_file_option,
    check_float,
    check_int,
    check_writable_parent,
    split_list_options,
)
from featpipe.runs.rundir import load_run
from featpipe.runtime.atomic import atomic_path
from featpipe.runtime.devices import default_workers
from featpipe.video.folders import VIDEO_EXTENSIONS, unreadable_note, walk_clips

MAX_TOP_K = 1000
MAX_WINDOWS = 256  # windows per clip averaged (each is one frames-long pass through the backbone)
MAX_WORKERS = 256
MAX_BATCH = 4096  # frames per backbone forward pass
MAX_TIMELINE = 86_400.0  # seconds per timeline window


@dataclass(frozen=True)
class PredictOptions:
    """What `featpipe predict` can be told besides the clips, checked once here for the CLI and the API."""

    model: str | Path = "models/latest"  # run directory, or models/latest
    top_k: int = 3  # labels per clip
    windows: int = 1  # evenly spaced windows of the run's frame count, averaged (the CLI's --clips)
    workers: int | None = None  # decoding threads; None = one per CPU core
    batch_size: int | None = None  # frames per backbone pass; None = sized for the device
    gif: str | Path | None = None  # single clip: write its sampled frames as a captioned GIF
    precision: str = "float32"  # backbone compute precision
    decoder: str = "auto"  # see featpipe.video.decode.read_clip: every decoder gives the same frames
    timeline: float | None = None  # classify consecutive windows of this many seconds, each on its own
    plot: str | Path | None = None  # single clip with timeline: a PNG of each class's probability over time

    def __post_init__(self) -> None:
        split_list_options(self)
        check_int("top_k", self.top_k, 1, MAX_TOP_K)
        check_int("windows", self.windows, 1, MAX_WINDOWS)
        check_int("workers", self.workers, 1, MAX_WORKERS, optional=True)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("decoder", self.decoder, DECODERS)
        check_float("timeline", self.timeline, 0, MAX_TIMELINE, low_open=True, optional=True)
        if self.timeline is not None and self.windows != 1:
            raise OptionError(
                "timeline",
                "classifies each window of the clip on its own and cannot be combined with --windows "
                "(which averages windows); give one of them.",
            )
        check_file_option("gif", self.gif, optional=True)
        if self.gif is not None:
            check_writable_parent("gif", self.gif, "the GIF")
        check_file_option("plot", self.plot, optional=True)
        if self.plot is not None:
            if self.timeline is None:
                raise OptionError("plot", "draws a timeline: give --timeline SECONDS with it.")
            check_writable_parent("plot", self.plot, "the plot")


@dataclass
class Prediction:
    """One clip's result: ``top`` is [(label, probability), ...] best first, or ``error`` says why not."""

    clip: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    probabilities: np.ndarray | None = None  # (n_classes,), averaged over windows
    windows: int = 0
    timeline: list = field(default_factory=list)  # TimelineWindow per window, with predict(timeline=S)
    duration: float | None = None  # the clip's length in seconds (None: not decoded)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if not self.ok:
            return {"clip": self.clip, "error": self.error}
        out = {"clip": self.clip, "top": [{"label": lab, "probability": round(float(p), 6)} for lab, p in self.top]}
        if self.duration is not None and np.isfinite(self.duration):
            out["duration"] = round(float(self.duration), 6)
        return out


@dataclass(frozen=True)
class ClipList:
    """What `predict` was given, folders expanded by the rule `extract` indexes a folder with.

    ``entries`` are ``(path, None)`` for a clip to classify and ``(folder, why)`` for a folder
    whose clips could not be indexed (it cannot be read); ``folders`` counts the clips found in
    each folder given.
    """

    entries: tuple[tuple[Path, str | None], ...]
    folders: tuple[tuple[Path, int], ...] = ()

    @property
    def paths(self) -> list[Path]:
        """The clips to classify, in order."""
        return [path for path, error in self.entries if error is None]

    @property
    def unreadable(self) -> list[tuple[Path, str]]:
        """(folder, reason) for each folder whose clips were not indexed."""
        return [(path, error) for path, error in self.entries if error is not None]


def find_clips(clips: str | Path | Iterable[str | Path] | ClipList) -> ClipList:
    """The clips of ``clips``: one path (a ``str`` or ``Path``) or a list of them; a file is one clip (a missing
    one is reported per clip, not here), a folder its video files found by :func:`featpipe.video.folders.walk_clips`
    (recursive, sorted, hidden entries skipped, linked folders followed once), the same clips `extract`
    indexes in it. A folder that cannot be read becomes an entry saying so; a folder with no video
    and nothing unreadable in it, or no clip at all, is a FeatpipeError."""
    if isinstance(clips, ClipList):
        return clips
    entries: list[tuple[Path, str | None]] = []
    folders: list[tuple[Path, int]] = []
    for path in as_paths("clips", clips, "a video file or a folder"):
        if not _is_dir(path):
            entries.append((path, None))
            continue
        found = walk_clips(path)
        if not found.clips and not found.unreadable:
            raise FeatpipeError(f"Folder '{path}' holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}).")
        folders.append((path, len(found.clips)))
        entries.extend((clip, None) for clip in found.clips)
        entries.extend((folder, unreadable_note(folder, why)) for folder, why in found.unreadable)
    if not entries:
        raise FeatpipeError("No clips given: pass one or more video files or folders.")
    return ClipList(tuple(entries), tuple(folders))


def expand_clips(items: str | Path | Iterable[str | Path]) -> list[Path]:
    """The clip files of ``items`` (see :func:`find_clips`); folders that cannot be read are left out."""
    return find_clips(items).paths


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # cannot even be looked at: reported per clip when it is decoded
        return False


class Predictor:
    """A loaded run: the recorded backbone (weights checked by fingerprint) and the trained head."""

    def __init__(self, model: str | Path = "models/latest", batch_size: int | None = None, precision: str = "float32"):
        check_int("batch_size", batch_size, 1, MAX_BATCH, optional=True)
        self.run_dir, self.info, self.head = load_run(model)  # RunInfo; model.keras checked against it
        pre = self.info.preprocessing
        self.class_names: list[str] = list(self.info.class_names)
        self.frames, self.size, self.sampling = int(pre["frames"]), int(pre["input_size"]), str(pre["sampling"])
        weights = str(pre["weights"])
        if weights not in (WEIGHTS_IMAGENET, WEIGHTS_NONE) and not Path(weights).exists():
            raise BackboneError(
                f"The run was trained on features from the weights file or preset folder '{weights}', which is not "
                f"on this machine; copy it to that path (the run checks it by fingerprint)."
            )
        self.extractor = frame_source(
            pre["backbone"], self.size, weights, int(pre.get("weights_seed", 0)), batch_size, precision
        )
        if self.extractor.fingerprint != pre["weights_fingerprint"]:
            raise BackboneError(
                f"The {pre['backbone']} weights here (fingerprint {self.extractor.fingerprint}) are not the ones the "
                "run "
                f"was trained with ({pre['weights_fingerprint']}); use the same weights file or Keras weights version."
            )

    def read(self, path: str | Path, windows: int = 1, timeline: float | None = None, decoder: str = "auto") -> list:
        """Decode a clip the way the run's clips were (frames, size, sampling): ``windows`` evenly spaced
        windows, or consecutive ``timeline``-second ones. A list of ClipFrames."""
        from featpipe.video.decode import read_timeline, read_windows  # lazy: no OpenCV on `import featpipe`
        from featpipe.video.plan import parse_sampling

        sampling, fps = parse_sampling(self.sampling)
        if timeline is not None:
            return read_timeline(path, self.frames, self.size, timeline, sampling, fps=fps, decoder=decoder)
        return read_windows(path, self.frames, self.size, sampling, windows, fps=fps, decoder=decoder)

    def features(self, windows: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features for decoded windows (ClipFrames), real frames batched across windows."""
        t = self.frames
        if not windows:
            return np.zeros((0, t, *self.extractor.feature_shape), np.float32), np.zeros((0, t), bool)
        (done,) = embed([Decoded(None, list(windows))], self.extractor)
        return done.features, np.stack([w.mask for w in windows])

    def classify(self, feats: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Head probabilities (n, classes) for features and masks."""
        if not len(feats):
            return np.zeros((0, len(self.class_names)))
        return np.asarray(self.head.predict({"features": feats, "mask": masks}, batch_size=64, verbose=0))


def predict(
    clips: str | Path | Iterable[str | Path] | ClipList,
    model: str | Path = "models/latest",
    top_k: int = 3,
    windows: int = 1,
    workers: int | None = None,
    batch_size: int | None = None,
    gif: str | Path | None = None,
    predictor: Predictor | None = None,
    precision: str = "float32",
    decoder: str = "auto",
    timeline: float | None = None,
    plot: str | Path | None = None,
) -> list[Prediction]:
    """Classify clips with a trained run. Returns one Prediction per clip, in order.

    ``clips`` is one path or a list of them (``predict("a.mp4")`` is one clip, never its letters);
    a folder means the video files in it, found as `extract` finds them (:func:`find_clips`). A
    folder that cannot be read gets a Prediction of its own, with ``error`` saying its clips were
    not indexed.

    ``windows`` > 1 averages the head's probabilities over that many evenly spaced windows of the
    run's frame count (for long videos). ``timeline`` (seconds) instead classifies each consecutive
    window ``[0, S), [S, 2S), ...`` on its own, sampled the way the run's clips were: the results are in
    ``Prediction.timeline`` (``top`` is their mean); ``plot`` (one clip only) draws it as a PNG. A clip that
    cannot be decoded gets ``error`` set; the others go on. ``gif`` (one clip only) writes its sampled
    frames captioned with the top label. ``decoder`` picks the video decoder (the same frames either way).
    Options are checked by :class:`PredictOptions` (OptionError before anything is loaded).
    """
    from featpipe.runs.timeline import plot_timeline, timeline_windows
    from featpipe.video.decode import write_gif  # lazy: `import featpipe` does not load OpenCV

    PredictOptions(
        model=model,
        top_k=top_k,
        windows=windows,
        workers=workers,
        batch_size=batch_size,
        gif=gif,
        precision=precision,
        decoder=decoder,
        timeline=timeline,
        plot=plot,
    )
    found = find_clips(clips)
    paths = found.paths
    if gif is not None and len(paths) != 1:
        raise FeatpipeError(f"--gif makes an animation of one clip; {len(paths)} clips were given.")
    if plot is not None and len(paths) != 1:
        raise FeatpipeError(f"--plot draws the timeline of one clip; {len(paths)} clips were given.")
    pred = predictor or Predictor(model, batch_size, precision)
    k = min(top_k, len(pred.class_names))

    def read(item: tuple[int, Path]):
        return pred.read(item[1], windows, timeline, decoder)

    def classify(group: list) -> None:  # one head call for a group of embedded clips
        probs = pred.classify(
            np.concatenate([e.features for e in group]), np.stack([w.mask for e in group for w in e.windows])
        )
        pos = 0
        for e in group:
            p = probs[pos : pos + len(e.windows)].mean(axis=0)
            pos += len(e.windows)
            order = np.argsort(-p, kind="stable")[:k]
            results[e.item[0]] = Prediction(
                str(e.item[1]),
                [(pred.class_names[i], float(p[i])) for i in order],
                None,
                p,
                len(e.windows),
                timeline_windows(e.windows, probs[pos - len(e.windows) : pos], pred.class_names, k, timeline)
                if timeline is not None
                else [],
                float(e.windows[0].duration),
            )
            if plot is not None:
                plot_timeline(results[e.item[0]], pred.class_names, plot)
            if gif is not None:
                best = results[e.item[0]].top[0]
                write_gif(e.windows[0].frames[e.windows[0].mask], gif, f"{best[0]} {best[1]:.0%}")

    # the stages extract uses: decode in threads -> embed (frames batched across clips) -> the head
    results: dict[int, Prediction] = {}
    todo = []
    for i, (path, error) in enumerate(found.entries):
        if error is None:
            todo.append((i, path))
        else:  # a folder whose clips could not be indexed
            results[i] = Prediction(str(path), error=error)
    group: list = []
    chunk = 32  # clips per head call
    for done in embed(decode(todo, read, workers or default_workers()), pred.extractor):
        if not done.ok:
            results[done.item[0]] = Prediction(str(done.item[1]), error=done.error)
            continue
        group.append(done)
        if len(group) == chunk:
            classify(group)
            group = []
    if group:
        classify(group)
    return [results[i] for i in range(len(found.entries))]


def check_csv_path(path: str | Path, name: str = "output") -> None:
    """A CSV destination must be a file in a writable folder (checked before predicting)."""
    check_file_option(name, path)
    check_writable_parent(name, path, "the CSV file")


def write_csv(predictions: Sequence[Prediction], path: str | Path, top_k: int) -> Path:
    """One row per clip: clip, label_1, probability_1, ..., error. Written beside ``path`` and renamed into place."""
    check_csv_path(path, "path")
    path = Path(path)
    header = ["clip"] + [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("label", "probability")] + ["error"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for p in predictions:
                cells = [p.clip]
                for i in range(top_k):
                    if i < len(p.top):
                        cells += [p.top[i][0], f"{p.top[i][1]:.6f}"]
                    else:
                        cells += ["", ""]
                writer.writerow(cells + [p.error or ""])
    except OSError as exc:
        raise FeatpipeError(
            f"Could not write '{path}' ({exc.strerror or exc}); choose a file in a folder you can write to."
        ) from None
    return path


def format_table(predictions: Sequence[Prediction]) -> str:
    """A readable table: each clip and its top labels with probabilities."""
    lines = []
    width = min(max((len(p.clip) for p in predictions), default=4), 60)
    for p in predictions:
        name = p.clip if len(p.clip) <= width else "..." + p.clip[-(width - 3) :]
        if p.ok:
            tops = "  ".join(f"{lab} {prob:.1%}" for lab, prob in p.top)
            lines.append(f"{name.ljust(width)}  {tops}")
        else:
            lines.append(f"{name.ljust(width)}  failed: {p.error}")
    return "\n".join(lines)


def to_json_lines(predictions: Sequence[Prediction]) -> str:
    return "\n".join(json.dumps(p.to_dict(), ensure_ascii=False) for p in predictions)
