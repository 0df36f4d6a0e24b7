"""`featpipe report`: one self-contained HTML page per run directory (report.html).

The page opens offline in any browser: images are inline (base64 ``data:`` URIs), the CSS is inline,
a few lines of inline JavaScript sort the per-class table, and nothing is fetched from the network.
It shows the headline metrics of one split (test when the cache has one, else val, and it says which),
the learning curves with the best epoch marked, the normalised confusion matrix, per-class precision,
recall, F1 and support, the misclassified clips worst first (the frames the model saw as thumbnails,
decoded as the cache recorded them), and the run's settings in a collapsed section.

The metrics and per-clip probabilities come from :func:`featpipe.runs.evaluate.evaluate_rows`, the
code ``featpipe evaluate`` runs, so the headline equals ``evaluate``'s for the same split and cache.
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError, RunWarning
from featpipe.options import check_int
from featpipe.runs.evaluate import evaluate_rows
from featpipe.runs.page import cards, details, document, duration, esc, facts, img, num, table
from featpipe.runs.rundir import RunInfo, load_run
from featpipe.runtime import atomic
from featpipe.training.inputs import open_index

REPORT_FILE = "report.html"
WORST = 24  # misclassified clips shown, worst first
THUMB_FRAMES = 8  # thumbnails per clip
THUMB_PX = 64  # thumbnail side in pixels
_DECODE_THREADS = 4

__all__ = ["REPORT_FILE", "write_report"]


def write_report(
    run: str | Path = "models/latest",
    split: str | None = None,
    cache: str | Path | None = None,
    worst: int = WORST,
    batch_size: int = 64,
) -> Path:
    """Write ``report.html`` into a run directory (or models/latest) and return its path.

    ``split``: the split the headline, tables and misclassified clips are about (default: test when
    ``cache`` has test clips, else val); ``cache``: the cache to score (default: the run's own), as for
    ``featpipe evaluate``. ``worst``: how many misclassified clips to show. A clip that no longer exists
    or cannot be decoded is listed without thumbnails. Raises FeatpipeError as ``evaluate`` does.
    """
    check_int("worst", worst, 0, 100_000)
    check_int("batch_size", batch_size, 1, 65_536)
    run_dir, info, model = load_run(run)
    cache_path = Path(cache) if cache is not None else Path(info.cache)
    with open_index(cache_path) as index:
        return report_from_index(run_dir, info, model, index, cache_path, split, worst, batch_size)


def report_from_index(
    run_dir: Path, info: RunInfo, model, index, cache_path: Path, split: str | None, worst: int, batch_size: int
) -> Path:
    """:func:`write_report` with the run's model and an open cache index in hand (``train`` calls this)."""
    chosen = split if split is not None else ("test" if len(index.rows("test")) else "val")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        try:
            metrics, rows, probs = evaluate_rows(run_dir, info, model, index, cache_path, chosen, batch_size)
        except FeatpipeError as exc:
            saved = _saved_metrics(run_dir, chosen)
            if split is not None or saved is None:
                raise
            # e.g. a run refit on train + val with no test split: val can no longer be scored, but train did so
            metrics, rows, probs = saved, None, None
            notes.append(f"Per-clip results are not shown: {exc}")
    notes[:0] = [str(w.message) for w in caught if issubclass(w.category, RunWarning)]
    for w in caught:  # anything else is passed on as it came
        if not issubclass(w.category, RunWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    clips = [] if rows is None else _misclassified(index, rows, probs, worst, info)
    n_wrong = 0 if rows is None else int((probs.argmax(axis=1) != index.labels[rows]).sum())
    page = _page(run_dir, info, index, cache_path, chosen, metrics, notes, clips, n_wrong, rows is not None)
    return atomic.write_text(run_dir / REPORT_FILE, page)


def _saved_metrics(run_dir: Path, split: str) -> dict | None:
    try:
        saved = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get(split) if isinstance(saved, dict) and isinstance(saved.get(split), dict) else None


# ----------------------------------------------------------------------------- misclassified clips


def _misclassified(index, rows: np.ndarray, probs: np.ndarray, worst: int, info: RunInfo) -> list[dict]:
    """The worst ``worst`` misclassified clips (highest probability on a wrong class first), with thumbnails."""
    labels = index.labels[rows]
    wrong = np.flatnonzero(probs.argmax(axis=1) != labels)
    other = probs.copy()
    other[np.arange(len(rows)), labels] = -1.0
    score = other.max(axis=1)  # the highest probability on a wrong class
    order = wrong[np.argsort(-score[wrong], kind="stable")][:worst]
    root = index.config.extra.get("data_root")
    names = index.class_names
    clips = []
    for i in order:
        video = str(index.videos[rows[i]])
        top = np.argsort(-probs[i], kind="stable")[:3]
        clips.append(
            {
                "video": video,
                "path": Path(root) / video if root else Path(video),
                "true": names[labels[i]],
                "top": [(names[j], float(probs[i, j])) for j in top],
                "score": float(score[i]),
            }
        )
    pre = info.preprocessing
    with ThreadPoolExecutor(_DECODE_THREADS) as pool:
        strips = list(pool.map(lambda c: _thumbnails(c["path"], pre), clips))
    for clip, (jpeg, problem) in zip(clips, strips):
        clip["jpeg"], clip["problem"] = jpeg, problem
    return clips


def _thumbnails(path: Path, pre: dict) -> tuple[bytes | None, str | None]:
    """(one JPEG strip of up to THUMB_FRAMES of the frames the model saw, or None; why not, or None)."""
    if not path.is_file():
        return None, "the clip is no longer there"
    try:
        import cv2

        from featpipe.video.decode import read_clip  # lazy: OpenCV
        from featpipe.video.plan import parse_sampling

        sampling, fps = parse_sampling(pre["sampling"])
        clip = read_clip(path, int(pre["frames"]), int(pre["input_size"]), sampling, fps=fps)
        real = clip.frames[clip.mask]
        if not len(real):
            return None, "no frames could be decoded"
        pick = np.unique(np.linspace(0, len(real) - 1, min(THUMB_FRAMES, len(real))).round().astype(int))
        small = [cv2.resize(f, (THUMB_PX, THUMB_PX), interpolation=cv2.INTER_AREA) for f in real[pick]]
        gap = np.full((THUMB_PX, 2, 3), 255, np.uint8)  # a white line between frames
        strip = np.concatenate([x for f in small for x in (f, gap)][:-1], axis=1)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
        return (jpeg.tobytes(), None) if ok else (None, "its frames could not be encoded")
    except Exception as exc:  # noqa: BLE001  a clip that cannot be shown never fails the report
        return None, f"it could not be decoded ({exc})"


# ----------------------------------------------------------------------------- the page

_SPLIT_WORDS = {"test": "Test", "val": "Validation", "train": "Training"}


def _page(run_dir, info, index, cache_path, split, metrics, notes, clips, n_wrong, per_clip) -> str:
    word = _SPLIT_WORDS.get(split, split.capitalize())
    parts = [f"<h1>{esc(run_dir.name)}</h1>", _headline(run_dir, info, index, cache_path, split, word, metrics)]
    parts += [f'<p class="note">{esc(n)}</p>' for n in notes]
    parts += [_curves(run_dir, info), _confusion(metrics, word), _per_class(metrics, word)]
    if per_clip:
        parts.append(_clips_section(clips, n_wrong, word, split))
    parts.append(_settings(info))
    return document(f"{run_dir.name}: featpipe report", parts)


def _headline(run_dir, info, index, cache_path, split, word, metrics) -> str:
    pre = info.preprocessing
    head = info.head.get("head", "?")
    if split != "test":
        said = f"{word} split: this cache has no test clips" if split == "val" else f"the {split} split"
        scope = f'<p id="split-note">Scores on the {esc(said)}.</p>'
    else:
        scope = '<p id="split-note">Scores on the test split (clips never used in training).</p>'
    headline = [
        ("accuracy", f"{word} accuracy", num(metrics.get("accuracy"))),
        ("macro-f1", f"{word} macro F1", num(metrics.get("macro_f1"))),
        ("clips", f"{word} clips", str(metrics.get("n", "?"))),
        ("classes", "classes", str(len(info.class_names))),
    ]
    epochs = f"{info.epochs_run} epochs, best epoch {info.best_epoch}"
    if info.refit_epochs:
        epochs += f", then refit on train + val for {info.refit_epochs} epochs"
    if info.interrupted:
        epochs += " (interrupted: written from the best checkpoint so far)"
    if info.diverged:
        epochs += f" (stopped: {info.diverged})"
    weights = pre.get("weights", "?")
    rows = [
        ("head", head),
        ("backbone", f"{pre.get('backbone', '?')} (weights: {weights})"),
        ("frames and size", f"{pre.get('frames')} frames of {pre.get('input_size')} px, {pre.get('sampling')}"),
        ("classes", ", ".join(info.class_names)),
        ("dataset", index.config.extra.get("data_root", "not recorded in the cache")),
        ("cache", str(cache_path)),
        ("trained", f"{info.created or 'unknown time'}, took {duration(info.seconds)}; {epochs}"),
        ("validation", info.validation or "not recorded"),
        ("run directory", str(run_dir)),
    ]
    return scope + cards(headline) + facts(rows)


def _curves(run_dir: Path, info: RunInfo) -> str:
    from featpipe.runs.metrics import curves_png  # lazy: matplotlib

    out = "<h2>Learning curves</h2>"
    try:
        import pandas as pd

        history = pd.read_csv(run_dir / "history.csv")
        png = curves_png(history, best_epoch=info.best_epoch or None)
    except (OSError, ValueError) as exc:  # no history.csv (or an empty one): the rest of the page still stands
        return out + f'<p class="note">No learning curves: {esc(exc)}</p>'
    best = f" The dashed line marks the best epoch ({info.best_epoch})." if info.best_epoch else ""
    return out + f"<p>Loss and accuracy per epoch, train and validation.{best}</p>" + img(png, "image/png", "curves")


def _confusion(metrics: dict, word: str) -> str:
    from featpipe.runs.metrics import confusion_matrix_png  # lazy: matplotlib

    png = confusion_matrix_png(metrics, normalized=True)
    return (
        f"<h2>Confusion matrix ({esc(word.lower())})</h2><p>Each row is a true class; each cell is the share of its "
        f"clips predicted as the column's class.</p>" + img(png, "image/png", "normalised confusion matrix")
    )


def _per_class(metrics: dict, word: str) -> str:
    rows = []
    for name in metrics["class_names"]:
        pc = metrics["per_class"][name]
        cells = [num(pc["precision"]), num(pc["recall"]), num(pc["f1"]), str(pc["support"])]
        rows.append([(name, False)] + [(c, True) for c in cells])
    header = ["class", "precision", "recall", "F1", "support"]
    return f"<h2>Per class ({esc(word.lower())})</h2><p>Click a column header to sort.</p>" + table(
        "per-class", header, rows
    )


def _clips_section(clips: list[dict], n_wrong: int, word: str, split: str) -> str:
    out = f'<h2>Misclassified clips ({esc(word.lower())})</h2><section id="misclassified">'
    if not n_wrong:
        return out + f'<p id="clips-note">No clip of the {esc(split)} split is misclassified.</p></section>'
    s = "" if n_wrong == 1 else "s"
    if len(clips) < n_wrong:
        sentence = f"The worst {len(clips)} of {n_wrong} misclassified clips"
    else:
        sentence = f"All {n_wrong} misclassified clip{s}"
    out += (
        f'<p id="clips-note">{sentence}, highest probability on a wrong class first. The thumbnails are '
        f"frames the model saw, decoded as the cache recorded them.</p>"
    )
    for clip in clips:
        top = ", ".join(f'{esc(name)} <span class="prob">{p:.3f}</span>' for name, p in clip["top"])
        thumbs = (
            img(clip["jpeg"], "image/jpeg", f"frames of {clip['video']}")
            if clip["jpeg"]
            else f'<p class="note">No thumbnails: {esc(clip["problem"])}.</p>'
        )
        out += (
            f'<div class="clip">{thumbs}<div>true: <b class="true">{esc(clip["true"])}</b>; predicted: {top}</div>'
            f"<div><code>{esc(clip['path'])}</code></div></div>"
        )
    return out + "</section>"


def _settings(info: RunInfo) -> str:
    data = info.to_dict()
    for key in ("train_clips", "val_clips"):  # thousands of names: their count says enough here
        if data.get(key) is not None:
            data[key] = f"{len(data[key])} clips (listed in run.json)"
    return "<h2>Settings</h2>" + details("The run's settings (run.json)", data)
