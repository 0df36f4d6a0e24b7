"""Evaluation metrics, a plain-text report and PNG plots for a trained classifier.

Pure numpy / scikit-learn / matplotlib (no Keras). Everything the metric functions compute comes
from :mod:`sklearn.metrics`; this module only validates inputs, picks the label sets and turns
the results into a compact JSON-serialisable dict (plain ``float`` / ``int`` / ``list``, with
``None`` wherever a value is undefined, never NaN, so ``json.dumps(m, allow_nan=False)`` works).

Conventions (see :func:`compute_metrics`):

* the predicted class is ``argmax(probs, axis=1)`` (ties go to the lowest class index);
* per-class precision / recall / F1 / support are reported for *every* class, in
  ``class_names`` order, with ``zero_division=0``;
* the macro and weighted averages are scikit-learn's defaults, i.e. over the classes that occur
  in ``y_true`` or in the predictions; a class that is neither present nor ever predicted has
  no data at all and does not drag the macro average down (the weighted average gives it weight
  0 anyway);
* ROC AUC: two classes -> the usual binary AUC of ``probs[:, 1]`` (class index 1, the second
  name in sorted order, is the positive class: REAL of FAKE/REAL; with two classes the AUC is the
  same whichever is called positive); more classes -> one-vs-rest macro AUC over the classes present
  in ``y_true`` (each such class has positives, and negatives as soon as two classes are
  present); ``None`` when fewer than two classes are present in ``y_true``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

__all__ = [
    "compute_metrics",
    "confusion_matrix_png",
    "curves_png",
    "format_report",
    "plot_confusion_matrix",
    "plot_curves",
]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _validate(y_true: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if isinstance(class_names, str):
        raise ValueError("class_names must be a sequence of names, not a single string")
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes < 2:
        raise ValueError(f"need at least 2 class names, got {n_classes}")
    if len(set(names)) != n_classes:
        raise ValueError(f"class_names must be unique, got {names}")

    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (n,), got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("y_true is empty (n == 0): nothing to evaluate")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, C), got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"length mismatch: y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} class names")

    if y.dtype == bool:
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must hold integer class indices, got non-integer values")
    y = y.astype(np.int64)
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(f"y_true has labels out of range [0, {n_classes - 1}]: {sorted(set(y[bad].tolist()))[:10]}")

    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"probs must be real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    return y, p, names


def _f(x: Any) -> float | None:
    """A plain float, or None when undefined (NaN / inf / None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    top_k: int = 3,
) -> dict:
    """Classification metrics of ``probs`` (n, C) against integer labels ``y_true`` (n,).

    Returns a compact JSON-serialisable dict::

        n, class_names, accuracy, top_k, top_k_accuracy,
        macro_precision, macro_recall, macro_f1, weighted_precision, weighted_recall, weighted_f1,
        per_class: {name: {precision, recall, f1, support}},
        roc_auc, roc_auc_method, roc_auc_per_class: {name: auc or None},
        confusion_matrix: [[...], ...]   # rows = true class, columns = predicted, all C classes

    ``top_k`` is clamped to ``min(top_k, C)`` and the k used is stored as ``top_k`` (with k == C
    the top-k accuracy is trivially 1). ROC AUC: for C == 2 the binary AUC of ``probs[:, 1]``;
    for C > 2 the unweighted mean of the one-vs-rest AUCs of the classes present in ``y_true``
    (``roc_auc_method`` says which); ``None`` when fewer than two classes are present.
    ``roc_auc_per_class`` holds each class's one-vs-rest AUC, ``None`` for classes absent from
    ``y_true``. Macro / weighted averages are over the classes present in ``y_true`` or
    predicted (scikit-learn's default label set). Inputs are validated with ``ValueError``.
    """
    y, p, names = _validate(y_true, probs, class_names)
    n, n_classes = p.shape
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    k = int(min(int(top_k), n_classes))
    labels = list(range(n_classes))
    y_pred = np.argmax(p, axis=1)

    # top-k: sklearn wants 1-D scores for two classes.
    with warnings.catch_warnings():
        # k == C gives a (correct) perfect score and a warning that it is meaningless.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        scores = p[:, 1] if n_classes == 2 else p
        top_k_acc = top_k_accuracy_score(y, scores, k=k, labels=labels)

    prec, rec, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    avg_kw = dict(zero_division=0)  # default label set: classes in y_true or y_pred
    per_class = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }

    # one-vs-rest AUC per class; defined only when the class has positives and negatives.
    present = np.unique(y)
    auc_per_class: dict[str, float | None] = {}
    for i, name in enumerate(names):
        pos = y == i
        auc_per_class[name] = _f(roc_auc_score(pos, p[:, i])) if 0 < pos.sum() < n else None
    if len(present) < 2:
        roc_auc, method = None, None
    elif n_classes == 2:
        roc_auc, method = _f(roc_auc_score(y, p[:, 1])), "binary"
    else:
        # every present class has positives, and negatives because >= 2 classes are present;
        # with all C present this equals roc_auc_score(y, p, multi_class="ovr", average="macro").
        roc_auc = _f(np.mean([auc_per_class[names[i]] for i in present]))
        method = "ovr_macro_present"

    return {
        "n": int(n),
        "class_names": names,
        "accuracy": float(accuracy_score(y, y_pred)),
        "top_k": k,
        "top_k_accuracy": float(top_k_acc),
        "macro_precision": float(precision_score(y, y_pred, average="macro", **avg_kw)),
        "macro_recall": float(recall_score(y, y_pred, average="macro", **avg_kw)),
        "macro_f1": float(f1_score(y, y_pred, average="macro", **avg_kw)),
        "weighted_precision": float(precision_score(y, y_pred, average="weighted", **avg_kw)),
        "weighted_recall": float(recall_score(y, y_pred, average="weighted", **avg_kw)),
        "weighted_f1": float(f1_score(y, y_pred, average="weighted", **avg_kw)),
        "per_class": per_class,
        "roc_auc": roc_auc,
        "roc_auc_method": method,
        "roc_auc_per_class": auc_per_class,
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).astype(int).tolist(),
    }


# --------------------------------------------------------------------------------------------
# text report
# --------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def _table(rows: list[list[str]], align: str) -> list[str]:
    """Rows of cells -> lines; ``align`` has one 'l'/'r' per column; every line the same length."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(align))]
    out = []
    for r in rows:
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        out.append("  ".join(cells))
    return out


def format_report(metrics: Mapping[str, Any]) -> str:
    """A plain-text report of a :func:`compute_metrics` dict (for the terminal and report.txt).

    A summary line, a per-class table (precision, recall, F1, support, one-vs-rest AUC) with
    macro / weighted averages, and the confusion matrix (rows = true class, columns =
    predicted). Column headers of the matrix are the class names when they are short, else
    class indices, with the index shown beside each row's name as the legend.
    """
    names = list(metrics["class_names"])
    k = metrics.get("top_k")
    head = (
        f"n={metrics['n']}  accuracy={_num(metrics['accuracy'])}  "
        f"top-{k} accuracy={_num(metrics.get('top_k_accuracy'))}  "
        f"macro F1={_num(metrics['macro_f1'])}  weighted F1={_num(metrics['weighted_f1'])}  "
        f"ROC AUC={_num(metrics.get('roc_auc'))}"
    )
    lines = [head, ""]

    # per-class table
    auc = metrics.get("roc_auc_per_class") or {}
    rows = [["class", "precision", "recall", "f1", "support", "auc"]]
    for name in names:
        pc = metrics["per_class"][name]
        rows.append(
            [name, _num(pc["precision"]), _num(pc["recall"]), _num(pc["f1"]), str(pc["support"]), _num(auc.get(name))]
        )
    total = sum(int(metrics["per_class"][c]["support"]) for c in names)
    rows.append(
        [
            "macro avg",
            _num(metrics.get("macro_precision")),
            _num(metrics.get("macro_recall")),
            _num(metrics["macro_f1"]),
            str(total),
            _num(metrics.get("roc_auc")),
        ]
    )
    rows.append(
        [
            "weighted avg",
            _num(metrics.get("weighted_precision")),
            _num(metrics.get("weighted_recall")),
            _num(metrics["weighted_f1"]),
            str(total),
            "",
        ]
    )
    table = _table(rows, "lrrrrr")
    rule = "-" * len(table[0])
    lines += [table[0], rule, *table[1 : 1 + len(names)], rule, *table[1 + len(names) :], ""]

    # confusion matrix
    cm = metrics["confusion_matrix"]
    count_w = max(len(str(v)) for row in cm for v in row)
    use_names = all(len(nm) <= max(6, count_w) for nm in names)
    if use_names:
        cols, row_labels = names, names
        lines.append("Confusion matrix (rows: true class, columns: predicted class)")
    else:
        idx_w = len(str(len(names) - 1))
        cols = [str(i) for i in range(len(names))]
        row_labels = [f"{i:>{idx_w}} {nm}" for i, nm in enumerate(names)]
        lines.append("Confusion matrix (rows: true class, columns: predicted class by index, as numbered on the rows)")
    cell_w = max(count_w, *(len(c) for c in cols))  # one width for every matrix column
    rows = [["true \\ pred", *(c.rjust(cell_w) for c in cols)]]
    rows += [[lab, *(str(v).rjust(cell_w) for v in r)] for lab, r in zip(row_labels, cm)]
    lines += _table(rows, "l" + "r" * len(cols))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _figure(figsize: tuple[float, float]):
    # A bare Figure with an Agg canvas: no pyplot, no global figure registry, no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _short(name: str, width: int = 32) -> str:
    """Shorten a long name in the middle, keeping its start and its (often distinguishing) end."""
    if len(name) <= width:
        return name
    tail = (width - 3) // 2
    return name[: width - 3 - tail] + "..." + name[-tail:]


def _tick_labels(names: Sequence[str], width: int = 32) -> list[str]:
    short = [_short(n, width) for n in names]
    if len(set(short)) < len(short):  # shortening made two names equal: number them
        short = [f"{i}: {s}" for i, s in enumerate(short)]
    return short


def plot_confusion_matrix(metrics: Mapping[str, Any], path: str | Path, normalized: bool = False) -> Path:
    """Write the confusion matrix of a :func:`compute_metrics` dict as a PNG heatmap.

    Cell colour is the row-normalised fraction (share of the true class), the text in each cell
    the raw count (``normalized``: that fraction, two decimals); class names on both axes, the title
    gives accuracy and n. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(confusion_matrix_png(metrics, normalized))
    return path


def _png(fig, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    fig.clear()
    return buffer.getvalue()


def confusion_matrix_png(metrics: Mapping[str, Any], normalized: bool = False) -> bytes:
    """:func:`plot_confusion_matrix`'s PNG as bytes (the HTML report inlines it)."""
    names = _tick_labels([str(n) for n in metrics["class_names"]])
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    c = len(names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion_matrix has shape {cm.shape}, expected ({c}, {c})")
    row_sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)

    side = min(max(4.5, 0.55 * c + 2.5), 16.0)
    fig = _figure((side + 1.2, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class")

    fontsize = 12 if c <= 5 else 9 if c <= 12 else 7
    for i in range(c):
        for j in range(c):
            ax.text(
                j,
                i,
                f"{frac[i, j]:.2f}" if normalized else str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if frac[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    label_fs = 10 if c <= 12 else 8
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=label_fs)
    ax.set_yticklabels(names, fontsize=label_fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = metrics.get("accuracy")
    what = "Confusion matrix, normalised by true class" if normalized else "Confusion matrix"
    ax.set_title(f"{what}  (accuracy {_num(acc, 3)}, n={metrics.get('n', int(cm.sum()))})")
    return _png(fig, bbox_inches="tight")


_ACC_KEYS = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy")


def _numeric(series: Any) -> np.ndarray:
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)


def _curve_data(history: Any) -> tuple["pd.DataFrame", np.ndarray, str | None, float | None]:
    """History -> (frame, 1-based epoch axis, accuracy column or None, best epoch or None)."""
    if isinstance(history, pd.DataFrame):
        df = history.reset_index(drop=True)
    elif isinstance(history, Mapping):
        try:
            df = pd.DataFrame({str(k): list(v) for k, v in history.items()})
        except ValueError as exc:
            raise ValueError(f"history columns must all have the same length: {exc}") from None
    else:
        raise ValueError(f"history must be a DataFrame or a dict of lists, got {type(history).__name__}")
    if len(df) == 0:
        raise ValueError("history is empty: no epochs to plot")
    acc_key = next((k for k in _ACC_KEYS if k in df.columns), None)
    if "loss" not in df.columns and acc_key is None and "val_loss" not in df.columns:
        raise ValueError(f"history has neither loss nor accuracy columns: {list(df.columns)}")

    x = np.arange(1, len(df) + 1, dtype=float)
    if "epoch" in df.columns:
        epochs = _numeric(df["epoch"])
        if np.all(np.isfinite(epochs)):
            x = epochs + 1 if epochs.min() == 0 else epochs  # CSVLogger writes 0-based epochs

    best_epoch = None
    if "val_loss" in df.columns:
        val_loss = _numeric(df["val_loss"])
        if np.isfinite(val_loss).any():
            best_epoch = float(x[int(np.nanargmin(np.where(np.isfinite(val_loss), val_loss, np.nan)))])
    return df, x, acc_key, best_epoch


def plot_curves(
    history: "pd.DataFrame | Mapping[str, Sequence[float]]", path: str | Path, best_epoch: float | None = None
) -> Path:
    """Write training curves (Keras-style history) as a PNG: loss and accuracy side by side.

    ``history`` is a DataFrame (e.g. a CSVLogger file) or a ``History.history`` dict with
    ``loss`` / ``accuracy`` and optionally ``val_loss`` / ``val_accuracy`` and ``epoch``.
    x is the 1-based epoch (an ``epoch`` column starting at 0, as CSVLogger writes, is shifted
    by one). The best epoch (``best_epoch``, 1-based, e.g. the run's own; by default the minimum ``val_loss``)
    is marked with a dashed vertical line. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(curves_png(history, best_epoch))
    return path


def curves_png(history: "pd.DataFrame | Mapping[str, Sequence[float]]", best_epoch: float | None = None) -> bytes:
    """:func:`plot_curves`'s PNG as bytes (the HTML report inlines it)."""
    df, x, acc_key, lowest_val_loss = _curve_data(history)
    best_epoch = lowest_val_loss if best_epoch is None else best_epoch

    def col(name: str | None) -> np.ndarray | None:
        if name is None or name not in df.columns:
            return None
        return _numeric(df[name])

    fig = _figure((11.0, 4.2))
    panels = [("loss", "loss", "val_loss"), ("accuracy", acc_key, f"val_{acc_key}" if acc_key else None)]
    for i, (title, train_key, val_key) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        marker = "o" if len(x) <= 30 else None
        plotted = False
        for key, label in ((train_key, "train"), (val_key, "val")):
            y = col(key)
            if y is not None:
                ax.plot(x, y, marker=marker, markersize=3, label=label)
                plotted = True
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best epoch {best_epoch:g}")
        if not plotted:
            ax.text(0.5, 0.5, f"no {title} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if x.size and float(x.max()) - float(x.min()) < 20 and np.all(x == np.round(x)):
            ax.set_xticks(np.unique(x))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return _png(fig)
