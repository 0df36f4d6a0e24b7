"""tune's ``report.html``: one self-contained page about a search, beside its leaderboard files.

Built with the run report's page machinery (:mod:`featpipe.runs.page`): inline CSS, one inline PNG, a
sortable table, the settings in a collapsed section, nothing fetched from the network. It shows the best
score (mean +/- std over the folds or seeds each trial was scored on), the trials finished, failed and
pruned, the cache and its backbone, how long the search took, and a link to the retrained best run's own
report.html; the best configuration; the score against the settings that mattered most; every finished
trial best first (failed ones after); and tune's options.

Which settings mattered most: ``optuna.importance.get_param_importances`` with Optuna's default evaluator
(PED-ANOVA in Optuna 4.x/5.x: fast, offline, and it rates the settings only some heads have), on the mean
validation accuracy of each finished trial. Where Optuna cannot rank them, the variance across a setting's
values of the mean score of the trials with that value (numeric settings with many values in 4 quantile
bins) ranks them instead; the page says which was used.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np

from featpipe.runs.page import cards, details, document, duration, esc, facts, img, num, table
from featpipe.runtime.atomic import write_text
from featpipe.training.search import SETTING_ORDER, describe

REPORT_FILE = "report.html"
TOP_SETTINGS = 4  # panels in the plot of score against settings

__all__ = ["REPORT_FILE", "importances", "write_tune_report"]


def write_tune_report(
    out: Path,
    trials: list,
    rows: list[dict],
    mode: str,
    about: dict,
    options: dict,
    run_dir: Path | None = None,
    test_accuracy: float | None = None,
) -> Path:
    """Write ``out/report.html`` (atomically) and return its path.

    ``trials``: every trial of the study (Optuna FrozenTrials); ``rows``: the leaderboard (finished trials,
    best first, as :func:`featpipe.training.study.leaderboard` makes it); ``mode``: "folds" or "seeds";
    ``about``: what the headline names (cache, backbone, study, seconds of this run, retrain seconds);
    ``options``: tune's options, shown collapsed; ``run_dir``/``test_accuracy``: the retrained best run.
    """
    import optuna

    state = optuna.trial.TrialState
    failed = [t for t in trials if t.state == state.FAIL]
    pruned = [t for t in trials if t.state == state.PRUNED]
    parts = [f"<h1>Search: {esc(out.name)}</h1>"]
    parts.append(_headline(out, rows, len(failed), len(pruned), mode, about, run_dir, test_accuracy))
    parts.append(_best(rows))
    parts.append(_plot_section(trials, rows, mode))  # before the trials: their table can be long
    parts.append(_trials(rows, failed + pruned, mode))
    parts.append("<h2>Settings</h2>" + details("tune's options (and the study they searched)", options))
    page = document(f"{out.name}: featpipe tune report", parts)
    path = out / REPORT_FILE
    return write_text(path, page, tmp=path.with_name(path.name + ".tmp"))


# ----------------------------------------------------------------------------- headline


def _headline(out, rows, n_failed, n_pruned, mode, about, run_dir, test_accuracy) -> str:
    best = rows[0] if rows else None
    over = {"folds": "the cross-validation folds", "seeds": "repeated seeds (train -> val)"}.get(mode, mode)
    if best is None:
        note = '<p class="note" id="no-trials">No trial has finished yet: the study has no score to show.</p>'
    else:
        note = (
            f'<p id="score-note">Score: validation accuracy of each trial, mean +/- std over {esc(over)} '
            f"(cv: {esc(mode)}); the test split is never looked at during the search.</p>"
        )
    headline = [
        (
            "best-score",
            "best val accuracy (mean +/- std)",
            f"{best['mean']:.4f} +/- {best['std']:.4f}" if best else "n/a",
        ),
        ("trials", "trials finished / failed / pruned", f"{len(rows)} / {n_failed} / {n_pruned}"),
    ]
    if test_accuracy is not None:
        headline.append(("test-accuracy", "retrained best: test accuracy", num(test_accuracy)))
    took = f"{duration(about.get('seconds', 0))} this run"
    trial_seconds = sum(float(r["seconds"] or 0) for r in rows)
    took += f"; {duration(trial_seconds)} of trial time over all runs"
    if about.get("retrain_seconds") is not None:
        took += f"; the best retrained in {duration(about['retrain_seconds'])}"
    rows_ = [
        ("metric", f"validation accuracy, mean +/- std over {over} (cv: {mode})"),
        ("best trial", f"#{best['number']}" if best else "none yet"),
        ("cache", str(about.get("cache", "?"))),
        ("backbone", str(about.get("backbone", "?"))),
        ("took", took),
        ("study", f"{about.get('study', '?')} in {out / 'study.db'}"),
    ]
    raw = frozenset()
    if run_dir is not None:
        page = Path(run_dir) / REPORT_FILE
        if page.is_file():
            href = Path(os.path.relpath(page, out)).as_posix()
            link = f'<a id="best-run" href="{esc(href)}">{esc(run_dir)}</a> (its report.html)'
        else:
            link = f"{esc(run_dir)} (its report.html was not written)"
        rows_.append(("retrained best run", link))
        raw = frozenset({"retrained best run"})
    return note + cards(headline) + facts(rows_, raw)


def _best(rows: list[dict]) -> str:
    if not rows:
        return ""
    best = rows[0]
    params = [(_label(k), _value(v)) for k, v in _ordered(best["params"])]
    scores = ", ".join(f"{s:.4f}" for s in best.get("scores", []))
    return (
        f'<h2>Best configuration (trial #{best["number"]})</h2><section id="best-config">'
        f"<p><code>{esc(describe(best['params']))}</code></p>{facts(params)}"
        f"<p>Scores of its fits: {esc(scores or 'n/a')}. <code>featpipe train</code> with these settings "
        f"reproduces it.</p></section>"
    )


# ----------------------------------------------------------------------------- tables


def _ordered(params: dict) -> list[tuple[str, object]]:
    known = [(k, params[k]) for k in SETTING_ORDER if k in params]
    return known + sorted((k, v) for k, v in params.items() if k not in SETTING_ORDER)


_LABELS = {"rnn": "head", "segment_layers": "layers", "half_frames": "half the frames"}  # search space -> column


def _label(key: str) -> str:
    return _LABELS.get(key, key)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _trials(rows: list[dict], unfinished: list, mode: str) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k, _ in _ordered(r["params"]) if k not in keys]
    keys = [k for k, _ in _ordered(dict.fromkeys(keys))]
    header = ["rank", "trial", "val accuracy", "std", *(_label(k) for k in keys), "seconds"]
    body = []
    for rank, r in enumerate(rows, 1):
        cells = [(str(rank), True), (str(r["number"]), True), (num(r["mean"]), True), (num(r["std"]), True)]
        for k in keys:
            v = r["params"].get(k)
            cells.append(("" if v is None else _value(v), not isinstance(v, str)))
        cells.append(("" if r["seconds"] is None else f"{float(r['seconds']):.1f}", True))
        body.append(cells)
    out = (
        f"<h2>Trials</h2><p>{len(rows)} finished trials, best first (val accuracy: mean over {esc(mode)}; ties "
        f"go to the lower val loss). Click a column header to sort.</p>" + table("trials-table", header, body)
    )
    if unfinished:
        rows_ = []
        for t in sorted(unfinished, key=lambda t: t.number):
            params = t.user_attrs.get("params", t.params)
            setting = " ".join(f"{_label(k)}={_value(v)}" for k, v in _ordered(params)) or "(no settings drawn yet)"
            started = t.datetime_start.strftime("%Y-%m-%d %H:%M:%S") if t.datetime_start else ""
            rows_.append([(str(t.number), True), (t.state.name.lower(), False), (setting, False), (started, False)])
        out += (
            f"<h3>Failed and pruned trials</h3><p>{len(unfinished)} trials did not finish (a stopped or killed "
            f"search fails the trials it was running); they are not ranked.</p>"
            + table("failed-trials", ["trial", "state", "settings", "started"], rows_)
        )
    return out


# ----------------------------------------------------------------------------- importance and the plot


def _score(t) -> float:
    scores = t.user_attrs.get("scores")
    return float(np.mean(scores)) if scores else float(t.value if t.value is not None else "nan")


def importances(trials: list) -> tuple[list[tuple[str, float]], str]:
    """The search-space settings that vary among the finished trials, most important first, and a sentence
    saying how importance was computed (see the module's docstring)."""
    import optuna

    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(_score(t))]
    varied = [
        k for k in dict.fromkeys(k for t in done for k in t.params) if len({repr(t.params.get(k)) for t in done}) > 1
    ]
    if not varied:
        return [], "No setting varies among the finished trials yet: nothing to rank."
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials(done)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranked = optuna.importance.get_param_importances(study, target=_score)
        few = any("too small" in str(w.message) for w in caught)
        order = [(k, float(v)) for k, v in ranked.items() if k in varied]
        order += [(k, 0.0) for k in varied if k not in ranked]
        how = (
            f"Importance: Optuna {optuna.__version__}'s get_param_importances with its default evaluator, on the "
            "mean validation accuracy of the finished trials (1 = all of the variation in score)."
        )
        if few:
            how += " Too few trials to tell the settings apart yet: every setting scored the same."
        return order, how
    except Exception as exc:  # noqa: BLE001  Optuna cannot rank these trials: the simpler measure below can
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    order = sorted(((k, _value_variance(done, k)) for k in varied), key=lambda kv: -kv[1])
    how = (
        "Importance: the variance, across a setting's values, of the mean validation accuracy of the trials with "
        f"that value (numeric settings with many values in 4 quantile bins); Optuna could not rank them ({reason})."
    )
    return order, how


def _value_variance(done: list, key: str) -> float:
    pairs = [(t.params[key], _score(t)) for t in done if key in t.params]
    values = [v for v, _ in pairs]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and len(set(values)) > 4:
        edges = np.quantile(values, [0.25, 0.5, 0.75])
        groups = [int(np.searchsorted(edges, v)) for v in values]
    else:
        groups = [repr(v) for v in values]
    means = [np.mean([s for g, (_, s) in zip(groups, pairs) if g == key_]) for key_ in dict.fromkeys(groups)]
    return float(np.var(means)) if len(means) > 1 else 0.0


def _plot_section(trials: list, rows: list[dict], mode: str) -> str:
    out = "<h2>Score against the most important settings</h2>"
    order, how = importances(trials)
    out += f'<p id="importance-note">{esc(how)}</p>'
    shown = order[:TOP_SETTINGS]
    if not shown:
        return out
    png = _plot_png(trials, rows, shown, mode)
    ranked = ", ".join(f"{_label(k)} {v:.2f}" for k, v in order)
    return out + f'<p id="importances">{esc(ranked)}</p>' + img(png, "image/png", "score against settings")


def _plot_png(trials: list, rows: list[dict], shown: list[tuple[str, float]], mode: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    from optuna.distributions import CategoricalDistribution

    mean = {r["number"]: r["mean"] for r in rows}
    best = rows[0]["number"] if rows else None
    done = [t for t in trials if t.number in mean and math.isfinite(mean[t.number])]
    cols = min(2, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, (key, weight) in zip(axes.flat, shown):
        have = [t for t in done if key in t.params]
        y = np.array([mean[t.number] for t in have])
        dist = next((t.distributions[key] for t in have if key in t.distributions), None)
        if isinstance(dist, CategoricalDistribution):
            choices = list(dist.choices)
            pos = np.array([choices.index(t.params[key]) for t in have], dtype=float)
            pos += np.linspace(-0.12, 0.12, len(pos)) if len(pos) > 1 else 0.0  # spread points of one value
            ax.set_xticks(range(len(choices)))
            ax.set_xticklabels([_value(c) for c in choices], fontsize=8)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            pos = np.array([float(t.params[key]) for t in have])
            low, high = (float(dist.low), float(dist.high)) if dist is not None else (pos.min(), pos.max())
            if getattr(dist, "log", False):
                ax.set_xscale("log")
                ax.set_xlim(low / 1.2, high * 1.2)  # the whole search space, decades marked
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                pad = 0.05 * (high - low) or 0.5
                ax.set_xlim(low - pad, high + pad)
        ax.scatter(pos, y, s=22, alpha=0.75, color="#3a6ea5")
        is_best = np.array([t.number == best for t in have])
        if is_best.any():
            ax.scatter(pos[is_best], y[is_best], s=90, marker="*", color="#d62728", label="best", zorder=3)
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{_label(key)} (importance {weight:.2f})", fontsize=9)
        ax.set_ylabel(f"val accuracy (mean, {mode})", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()
