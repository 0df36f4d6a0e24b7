"""Tests for featpipe.runs.metrics: metric values, the text report and the PNG plots."""

from __future__ import annotations

import json
import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from featpipe.runs.metrics import _curve_data, compute_metrics, format_report, plot_confusion_matrix, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LONG_NAMES = [f"a_rather_long_action_class_name_{i:02d}_with_suffix" for i in range(12)]


def one_hot_probs(pred, n_classes: int, hit: float = 0.6) -> np.ndarray:
    """Probabilities with ``hit`` on the predicted class and the rest spread evenly."""
    pred = np.asarray(pred)
    p = np.full((len(pred), n_classes), (1.0 - hit) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = hit
    return p


def random_case(n: int, n_classes: int, seed: int = 0, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def assert_json_strict(m: dict) -> None:
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------- compute_metrics


def test_perfect_predictions_give_accuracy_f1_auc_one_and_diagonal_confusion():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3])
    m = compute_metrics(y, one_hot_probs(y, 4, hit=0.9), ["a", "b", "c", "d"])
    assert m["n"] == 9
    assert m["accuracy"] == 1.0
    assert m["top_k_accuracy"] == 1.0
    assert m["macro_f1"] == 1.0 and m["weighted_f1"] == 1.0
    assert m["macro_precision"] == 1.0 and m["macro_recall"] == 1.0
    assert m["roc_auc"] == 1.0
    assert m["roc_auc_per_class"] == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    assert m["confusion_matrix"] == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3]]
    assert_json_strict(m)


def test_perfect_binary_predictions():
    y = np.array([0, 1, 1, 0, 1])
    m = compute_metrics(y, one_hot_probs(y, 2, hit=0.8), ["REAL", "FAKE"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["roc_auc"] == 1.0
    assert m["roc_auc_method"] == "binary"
    assert m["confusion_matrix"] == [[2, 0], [0, 3]]


def test_hand_computed_three_class_example():
    # true:  0 0 0 1 1 1 2 2
    # pred:  0 0 1 1 1 1 2 0
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 1, 2, 0])
    m = compute_metrics(y, one_hot_probs(pred, 3), ["x", "y", "z"])

    assert m["confusion_matrix"] == [[2, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    # precision = TP / predicted: x 2/3, y 3/4, z 1/1; recall = TP / support: x 2/3, y 3/3, z 1/2
    expected = {
        "x": (Fraction(2, 3), Fraction(2, 3), 3),
        "y": (Fraction(3, 4), Fraction(1), 3),
        "z": (Fraction(1), Fraction(1, 2), 2),
    }
    for name, (prec, rec, support) in expected.items():
        pc = m["per_class"][name]
        f1 = 2 * prec * rec / (prec + rec)  # x 2/3, y 6/7, z 2/3
        assert pc["precision"] == pytest.approx(float(prec))
        assert pc["recall"] == pytest.approx(float(rec))
        assert pc["f1"] == pytest.approx(float(f1))
        assert pc["support"] == support
    assert m["per_class"]["y"]["f1"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx(46 / 63)  # (2/3 + 6/7 + 2/3) / 3
    assert m["weighted_f1"] == pytest.approx(31 / 42)  # (3*2/3 + 3*6/7 + 2*2/3) / 8
    assert m["macro_precision"] == pytest.approx(29 / 36)  # (2/3 + 3/4 + 1) / 3
    assert m["macro_recall"] == pytest.approx(13 / 18)  # (2/3 + 1 + 1/2) / 3
    assert m["class_names"] == ["x", "y", "z"]
    assert_json_strict(m)


def test_top_k_accuracy_hand_computed_top1_wrong_top2_right():
    probs = np.array(
        [
            [0.5, 0.3, 0.2],  # y=1: top-1 wrong (0), top-2 {0,1} right
            [0.1, 0.2, 0.7],  # y=2: top-1 right
            [0.6, 0.3, 0.1],  # y=2: top-2 {0,1} wrong
            [0.2, 0.5, 0.3],  # y=0: top-2 {1,2} wrong
        ]
    )
    y = np.array([1, 2, 2, 0])
    m1 = compute_metrics(y, probs, ["a", "b", "c"], top_k=1)
    m2 = compute_metrics(y, probs, ["a", "b", "c"], top_k=2)
    assert m1["top_k"] == 1 and m1["top_k_accuracy"] == pytest.approx(1 / 4)
    assert m1["accuracy"] == pytest.approx(1 / 4)
    assert m2["top_k"] == 2 and m2["top_k_accuracy"] == pytest.approx(2 / 4)
    assert m2["accuracy"] == pytest.approx(1 / 4)


def test_top_k_is_clamped_to_number_of_classes():
    y = np.array([1, 2, 2, 0])
    probs = one_hot_probs([0, 0, 0, 0], 3)
    m = compute_metrics(y, probs, ["a", "b", "c"], top_k=5)
    assert m["top_k"] == 3
    assert m["top_k_accuracy"] == 1.0
    mb = compute_metrics(np.array([0, 1, 1]), one_hot_probs([1, 0, 0], 2), ["REAL", "FAKE"])  # default top_k=3
    assert mb["top_k"] == 2 and mb["top_k_accuracy"] == 1.0 and mb["accuracy"] == 0.0


def test_binary_top1_accuracy_uses_positive_class_column():
    y = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.2, 0.9, 0.3, 0.6, 0.7])  # argmax: 0 1 0 1 1 -> 3 of 5 right
    m = compute_metrics(y, np.column_stack([1 - p1, p1]), ["REAL", "FAKE"], top_k=1)
    assert m["top_k"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["top_k_accuracy"] == pytest.approx(3 / 5)


def test_binary_auc_matches_sklearn_and_hand_value():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: pairs won 3 of 4 -> AUC 0.75
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = compute_metrics(y, np.column_stack([1 - p1, p1]), ["REAL", "FAKE"])
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["roc_auc_per_class"]["FAKE"] == pytest.approx(0.75)

    y, p = random_case(300, 2, seed=3, signal=0.7)
    m = compute_metrics(y, p, ["REAL", "FAKE"])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert 0.5 < m["roc_auc"] < 1.0


def test_multiclass_auc_is_sklearn_ovr_macro_when_all_classes_present():
    y, p = random_case(200, 5, seed=1, signal=0.8)
    m = compute_metrics(y, p, list("abcde"))
    assert m["roc_auc_method"] == "ovr_macro_present"
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for i, name in enumerate("abcde"):
        assert m["roc_auc_per_class"][name] == pytest.approx(roc_auc_score(y == i, p[:, i]))


def test_class_absent_from_y_true_has_support_zero_and_auc_over_present_classes():
    names = ["a", "b", "c", "never_seen"]
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],
            [0.4, 0.3, 0.2, 0.1],
            [0.2, 0.6, 0.1, 0.1],
            [0.5, 0.3, 0.1, 0.1],
            [0.1, 0.1, 0.7, 0.1],
            [0.3, 0.2, 0.4, 0.1],
            [0.2, 0.5, 0.2, 0.1],
            [0.1, 0.8, 0.05, 0.05],
        ]
    )
    m = compute_metrics(y, probs, names)
    absent = m["per_class"]["never_seen"]
    assert absent == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["roc_auc_per_class"]["never_seen"] is None
    present_aucs = [roc_auc_score(y == i, probs[:, i]) for i in range(3)]
    assert m["roc_auc"] == pytest.approx(np.mean(present_aucs))
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert [row[3] for row in m["confusion_matrix"]] == [0, 0, 0, 0]  # never predicted either
    assert len(m["confusion_matrix"]) == 4
    # macro averages skip the class that has no data at all (sklearn's default label set)
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class"][c]["f1"] for c in "abc"]))
    assert_json_strict(m)
    format_report(m)  # and the report copes with it


def test_only_one_class_present_gives_roc_auc_none():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an undefined AUC must be detected, not computed with a warning
        y = np.array([1, 1, 1])
        m = compute_metrics(y, one_hot_probs([1, 0, 1], 3), ["a", "b", "c"])
        assert m["roc_auc"] is None
        assert all(v is None for v in m["roc_auc_per_class"].values())
        assert m["accuracy"] == pytest.approx(2 / 3)
        assert_json_strict(m)
        mb = compute_metrics(np.array([0, 0]), one_hot_probs([0, 1], 2), ["REAL", "FAKE"])
        assert mb["roc_auc"] is None
        assert_json_strict(mb)
        assert "ROC AUC=n/a" in format_report(mb)


def test_result_is_plain_python_types():
    y, p = random_case(50, 3, seed=2)
    m = compute_metrics(y.astype(np.int32), p.astype(np.float32), ("a", "b", "c"))
    assert type(m["n"]) is int and type(m["accuracy"]) is float and type(m["top_k"]) is int
    assert type(m["per_class"]["a"]["support"]) is int
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert isinstance(m["class_names"], list)
    assert sum(map(sum, m["confusion_matrix"])) == 50
    assert_json_strict(m)


@pytest.mark.parametrize(
    "y, probs, names, kwargs, match",
    [
        ([0, 1, 1], np.full((2, 2), 0.5), ["a", "b"], {}, "length mismatch"),
        ([0, 1], np.full((2, 3), 1 / 3), ["a", "b"], {}, "3 columns"),
        ([0, 1], np.full(2, 0.5), ["a", "b"], {}, "2-D"),
        ([[0, 1]], np.full((2, 2), 0.5), ["a", "b"], {}, "1-D"),
        ([], np.zeros((0, 2)), ["a", "b"], {}, "empty"),
        ([0, 2], np.full((2, 2), 0.5), ["a", "b"], {}, "out of range"),
        ([0, -1], np.full((2, 2), 0.5), ["a", "b"], {}, "out of range"),
        ([0, 0.5], np.full((2, 2), 0.5), ["a", "b"], {}, "integer"),
        (["a", "b"], np.full((2, 2), 0.5), ["a", "b"], {}, "integer"),
        ([0, 1], [[0.5, 0.5], [np.nan, 0.5]], ["a", "b"], {}, "probs contains NaN"),
        ([0, 1], [[0.5, 0.5], [np.inf, 0.5]], ["a", "b"], {}, "probs contains NaN or infinite"),
        ([0, 0], np.ones((2, 1)), ["a"], {}, "at least 2"),
        ([0, 1], np.full((2, 2), 0.5), ["a", "a"], {}, "unique"),
        ([0, 1], np.full((2, 2), 0.5), ["a", "b"], {"top_k": 0}, "top_k"),
    ],
)
def test_input_validation_errors(y, probs, names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(np.asarray(y), np.asarray(probs), names, **kwargs)


def test_integral_float_labels_are_accepted():
    m = compute_metrics(np.array([0.0, 1.0, 1.0]), one_hot_probs([0, 1, 0], 2), ["a", "b"])
    assert m["accuracy"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------- format_report


def _table_block(report: str) -> list[str]:
    """Header plus per-class rows of the report's class table (between header and first rule)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class "))
    assert set(lines[start + 1]) == {"-"}
    end = next(i for i in range(start + 2, len(lines)) if lines[i] and set(lines[i]) == {"-"})
    return lines[start : start + 1] + lines[start + 2 : end]


def _matrix_block(report: str) -> list[str]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("true \\ pred"))
    block = lines[start:]
    return [line for line in block if line]


def test_format_report_two_classes():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0])
    m = compute_metrics(y, one_hot_probs(pred, 2, hit=0.7), ["REAL", "FAKE"])
    report = format_report(m)
    assert "REAL" in report and "FAKE" in report
    assert "n=7" in report
    assert f"accuracy={m['accuracy']:.4f}" in report
    assert f"macro F1={m['macro_f1']:.4f}" in report
    assert f"ROC AUC={m['roc_auc']:.4f}" in report
    assert "top-2 accuracy=" in report

    table = _table_block(report)
    assert len(table) == 3
    assert len({len(line) for line in table}) == 1

    matrix = _matrix_block(report)
    assert len(matrix) == 3
    assert matrix[0].split()[-2:] == ["REAL", "FAKE"]  # short names used as column headers
    assert matrix[1].split() == ["REAL", "2", "1"]
    assert matrix[2].split() == ["FAKE", "1", "3"]
    assert len({len(line) for line in matrix}) == 1


def test_format_report_twelve_long_named_classes():
    y, p = random_case(240, 12, seed=5, signal=1.0)
    m = compute_metrics(y, p, LONG_NAMES)
    report = format_report(m)
    for name in LONG_NAMES:
        assert name in report
    assert f"accuracy={m['accuracy']:.4f}" in report

    table = _table_block(report)
    assert len(table) == 13
    assert len({len(line) for line in table}) == 1
    for name, line in zip(LONG_NAMES, table[1:]):
        pc = m["per_class"][name]
        assert line.startswith(name)
        assert line.split()[1:5] == [
            f"{pc['precision']:.4f}",
            f"{pc['recall']:.4f}",
            f"{pc['f1']:.4f}",
            str(pc["support"]),
        ]

    matrix = _matrix_block(report)
    assert len(matrix) == 13
    assert len({len(line) for line in matrix}) == 1
    assert matrix[0].split()[-12:] == [str(i) for i in range(12)]  # indices as column headers
    for i, (name, line, row) in enumerate(zip(LONG_NAMES, matrix[1:], m["confusion_matrix"])):
        assert line.split() == [str(i), name, *map(str, row)]
    assert max(len(line) for line in report.splitlines()) < 160


# ------------------------------------------------------------------------------------------ plots


@pytest.mark.parametrize("names", [["REAL", "FAKE"], LONG_NAMES], ids=["2", "12"])
def test_plot_confusion_matrix_writes_png(tmp_path, names):
    y, p = random_case(120, len(names), seed=7)
    m = compute_metrics(y, p, names)
    out = plot_confusion_matrix(m, tmp_path / "sub" / "confusion_matrix.png")
    assert out == tmp_path / "sub" / "confusion_matrix.png"
    assert is_png(out)


def test_plot_confusion_matrix_accepts_string_path_and_absent_class(tmp_path):
    y = np.array([0, 1, 0, 1])
    m = compute_metrics(y, one_hot_probs([0, 1, 1, 1], 3), ["a", "b", "c"])
    out = plot_confusion_matrix(m, str(tmp_path / "cm.png"))
    assert is_png(out)


def test_the_normalised_confusion_matrix_is_another_picture_of_the_same_matrix(tmp_path):
    """report.html shows shares of each true class: the cells then read 0.67, not 2."""
    from featpipe.runs.metrics import confusion_matrix_png

    m = compute_metrics(np.array([0, 0, 0, 1, 1]), one_hot_probs([0, 0, 1, 1, 1], 2), ["a", "b"])
    counts, shares = confusion_matrix_png(m), confusion_matrix_png(m, normalized=True)
    assert counts == plot_confusion_matrix(m, tmp_path / "cm.png").read_bytes()
    assert shares != counts and shares.startswith(b"\x89PNG")
    assert plot_confusion_matrix(m, tmp_path / "n.png", normalized=True).read_bytes() == shares


def _history(n_epochs: int, val: bool = True) -> dict[str, list[float]]:
    h = {
        "loss": list(np.linspace(1.2, 0.3, n_epochs)),
        "accuracy": list(np.linspace(0.4, 0.95, n_epochs)),
    }
    if val:
        h["val_loss"] = [1.3, 0.9, 0.7, 0.8, 0.85, 0.9][:n_epochs]
        h["val_accuracy"] = [0.4, 0.6, 0.7, 0.68, 0.66, 0.65][:n_epochs]
    return h


@pytest.mark.parametrize("as_frame", [False, True], ids=["dict", "dataframe"])
def test_plot_curves_writes_png(tmp_path, as_frame):
    h = _history(6)
    if as_frame:
        h = pd.DataFrame(h).assign(epoch=range(6), lr=1e-3)  # CSVLogger-style, 0-based epoch
    out = plot_curves(h, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert is_png(out)


def test_plot_curves_without_val_columns(tmp_path):
    out = plot_curves(_history(4, val=False), str(tmp_path / "curves.png"))
    assert is_png(out)
    one_epoch = plot_curves(pd.DataFrame({"loss": [0.9], "accuracy": [0.5]}), tmp_path / "one.png")
    assert is_png(one_epoch)


def test_curves_use_one_based_epochs_and_best_epoch_is_min_val_loss():
    _, x, acc_key, best = _curve_data(_history(6))  # val_loss minimum at the 3rd epoch
    assert x.tolist() == [1, 2, 3, 4, 5, 6] and acc_key == "accuracy" and best == 3
    csv_logger = pd.DataFrame(_history(6)).assign(epoch=range(6))  # CSVLogger: epoch 0..5
    _, x, _, best = _curve_data(csv_logger)
    assert x.tolist() == [1, 2, 3, 4, 5, 6] and best == 3
    _, x, _, best = _curve_data(pd.DataFrame(_history(4)).assign(epoch=[1, 2, 3, 4]))
    assert x.tolist() == [1, 2, 3, 4] and best == 3
    _, _, _, best = _curve_data(_history(4, val=False))
    assert best is None
    _, _, acc_key, best = _curve_data({"loss": [1.0, 0.5], "val_loss": [float("nan"), 0.7], "acc": [0.1, 0.2]})
    assert acc_key == "acc" and best == 2


def test_plot_curves_rejects_empty_or_unusable_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_curves({"loss": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="neither loss nor accuracy"):
        plot_curves({"lr": [0.1, 0.01]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_curves_mark_the_best_epoch_given_else_the_lowest_val_loss(tmp_path):
    """A run's own best epoch (run.json) is what report.html marks; by default it is the lowest val_loss (3)."""
    from featpipe.runs.metrics import curves_png

    h = _history(6)
    assert curves_png(h) == curves_png(h, best_epoch=3) == plot_curves(h, tmp_path / "c.png").read_bytes()
    assert curves_png(h, best_epoch=5) != curves_png(h)
