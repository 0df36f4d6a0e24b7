"""`featpipe predict --timeline SECONDS`: where in a long clip each class appears.

The clip is cut into consecutive windows ``[0, S), [S, 2S), ...`` by time
(:func:`featpipe.video.decode.read_timeline`), each window is sampled the way the run's clips were and
classified on its own; this module turns the per-window probabilities into rows (a table, JSON Lines,
a CSV) and a picture of each class's probability over time.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featpipe.errors import FeatpipeError
from featpipe.runtime.atomic import atomic_path

MAX_PLOTTED = 10  # classes drawn: those with the highest peak probability


@dataclass(frozen=True)
class TimelineWindow:
    """One window of a clip: ``[start, end)`` seconds, its top labels and every class's probability."""

    start: float
    end: float
    top: list[tuple[str, float]]
    probabilities: np.ndarray

    def to_dict(self, clip: str) -> dict:
        return {
            "clip": clip,
            "start": round(self.start, 6),
            "end": round(self.end, 6),
            "top": [{"label": lab, "probability": round(float(p), 6)} for lab, p in self.top],
        }


def timeline_windows(windows: Sequence, probs: np.ndarray, class_names: Sequence[str], k: int, seconds: float) -> list:
    """TimelineWindows from decoded windows (ClipFrames from ``read_timeline``) and their head probabilities.

    A window starts at ``w * seconds`` (``w`` from its first frame's time: windows without a frame, in a
    gap of a variable frame rate clip, are absent) and ends ``seconds`` later or where the clip ends.
    """
    out = []
    for clip, p in zip(windows, probs):
        start = math.floor(float(clip.times[0]) / seconds + 1e-9) * seconds
        end = min(start + seconds, float(clip.duration)) if clip.duration > start else start + seconds
        order = np.argsort(-p, kind="stable")[:k]
        out.append(TimelineWindow(start, end, [(class_names[i], float(p[i])) for i in order], np.asarray(p)))
    return out


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour), with tenths when the time is not a whole second."""
    whole = abs(seconds - round(seconds)) < 1e-6
    s = round(seconds) if whole else seconds
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    sec = f"{int(secs):02d}" if whole else f"{secs:04.1f}"
    return f"{int(hours)}:{int(minutes):02d}:{sec}" if hours else f"{int(minutes)}:{sec}"


def format_timeline(predictions: Sequence) -> str:
    """For each clip, its name and one line per window: start - end, then the top labels."""
    lines = []
    for p in predictions:
        if not p.ok:
            lines.append(f"{p.clip}  failed: {p.error}")
            continue
        lines.append(f"{p.clip}  ({len(p.timeline)} windows, {clock(p.duration or 0.0)})")
        for w in p.timeline:
            tops = "  ".join(f"{lab} {prob:.1%}" for lab, prob in w.top)
            lines.append(f"  {clock(w.start):>9} - {clock(w.end):<9}  {tops}")
    return "\n".join(lines)


def timeline_json_lines(predictions: Sequence) -> str:
    """JSON Lines: one object per window (``clip``, ``start``, ``end``, ``top``), or per failed clip (``error``)."""
    rows = []
    for p in predictions:
        if not p.ok:
            rows.append(json.dumps({"clip": p.clip, "error": p.error}, ensure_ascii=False))
        rows.extend(json.dumps(w.to_dict(p.clip), ensure_ascii=False) for w in p.timeline)
    return "\n".join(rows)


def write_timeline_csv(predictions: Sequence, path: str | Path, top_k: int) -> Path:
    """One row per window: clip, start, end, label_1, probability_1, ..., error (a failed clip: one row)."""
    path = Path(path)
    header = ["clip", "start", "end"]
    header += [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("label", "probability")] + ["error"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for p in predictions:
                if not p.ok:
                    writer.writerow([p.clip, "", ""] + [""] * (2 * top_k) + [p.error])
                for w in p.timeline:
                    cells = [p.clip, f"{w.start:.3f}", f"{w.end:.3f}"]
                    for i in range(top_k):
                        cells += [w.top[i][0], f"{w.top[i][1]:.6f}"] if i < len(w.top) else ["", ""]
                    writer.writerow(cells + [""])
    except OSError as exc:
        raise FeatpipeError(
            f"Could not write '{path}' ({exc.strerror or exc}); choose a file in a folder you can write to."
        ) from None
    return path


def plot_timeline(prediction, class_names: Sequence[str], path: str | Path) -> Path:
    """A PNG of each class's probability over the clip: a heat map, one row per class (the ``MAX_PLOTTED``
    classes with the highest peak, in the order they first lead), time in the clip across, dark (0) to
    bright (1), each window's leading probability written in its cell when the cells are wide enough."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    windows = prediction.timeline
    probs = np.stack([w.probabilities for w in windows])  # (windows, classes)
    edges = np.array([w.start for w in windows] + [windows[-1].end])
    peaks = np.argsort(-probs.max(axis=0), kind="stable")[:MAX_PLOTTED]
    first_lead = {c: int(np.argmax(probs[:, c])) for c in peaks}
    shown = sorted(peaks, key=lambda c: (first_lead[c], -probs[:, c].max()))
    fig, ax = plt.subplots(figsize=(min(18, 6 + 0.25 * len(windows)), 1.2 + 0.45 * len(shown)))
    mesh = ax.pcolormesh(edges, np.arange(len(shown) + 1), probs[:, shown].T, vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(np.arange(len(shown)) + 0.5)
    ax.set_yticklabels([class_names[c] for c in shown])
    ax.invert_yaxis()
    if len(windows) <= 40:
        leader = probs[:, shown].argmax(axis=1)
        for w, row in enumerate(leader):
            value = probs[w, shown[row]]
            ax.text(
                (edges[w] + edges[w + 1]) / 2,
                row + 0.5,
                f"{value:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if value > 0.6 else "white",
            )
    ax.set_xlabel("time in the clip (seconds)")
    step = windows[1].start - windows[0].start if len(windows) > 1 else windows[0].end - windows[0].start
    ax.set_title(f"{Path(prediction.clip).name}: probability of each class per {step:g} s window")
    fig.colorbar(mesh, ax=ax, label="probability", fraction=0.03, pad=0.01)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, tmp=path.with_name(path.stem + ".tmp.png")) as tmp:  # the suffix names the format
            fig.savefig(tmp, dpi=110)
    except OSError as exc:
        raise FeatpipeError(
            f"Could not write '{path}' ({exc.strerror or exc}); choose a file in a folder you can write to."
        ) from None
    finally:
        plt.close(fig)
    return path
