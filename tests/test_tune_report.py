"""tune's report.html: one self-contained page about a search, checked as a person reads it (html.parser).

No trial is trained here: a study is filled with finished trials of known scores (and one failed trial)
before ``tune`` runs with ``--trials`` already reached, so the search ends at once and writes its outputs;
the retrained best is a stand-in run directory (train's own report is tested in tests/test_report.py).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from caches import tiny_cache
from featpipe.cli import app
from featpipe.errors import RunWarning
from featpipe.training import tune as tune_module
from featpipe.training.search import TuneOptions, suggest
from featpipe.training.tune import describe
from test_report import Node, Page

runner = CliRunner()
HEADS = ("segments", "mean")
SCORES = [0.5, 0.75, 0.25, 0.625]  # mean val accuracy of trials 0.. (as finished, before the failed one)


def _opts(cache: Path, out: Path, **kw) -> TuneOptions:
    return TuneOptions(cache=cache, heads=HEADS, trials=len(SCORES), out=out, models_dir=out.parent / "models", **kw)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, Path]:
    """A cache and a study.db with len(SCORES) finished trials (the two heads' defaults first) and one failed."""
    import optuna

    from featpipe.training.inputs import open_index
    from featpipe.training.search import defaults_as_trial
    from featpipe.training.study import load_study, study_name

    root = tmp_path_factory.mktemp("tune-report")
    cache = tiny_cache(root / "c.h5")
    opts = _opts(cache, root / "tune")
    index = open_index(cache)
    opts_out = Path(opts.out)
    opts_out.mkdir()
    study = load_study(opts_out / "study.db", study_name(index, opts, "folds"), 0)
    for head in HEADS:
        study.enqueue_trial(defaults_as_trial(head, index.config.frames))
    for score in SCORES:
        trial = study.ask()
        params = suggest(trial, HEADS, index.config.frames)
        fits = [score - 0.125, score, score + 0.125]
        trial.set_user_attr("params", params)
        trial.set_user_attr("scores", fits)
        trial.set_user_attr("losses", [1.0, 1.0, 1.0])
        trial.set_user_attr("seconds", 2.5)
        study.tell(trial, score)
    broken = study.ask()
    suggest(broken, HEADS, index.config.frames)
    study.tell(broken, state=optuna.trial.TrialState.FAIL)
    return cache, opts_out


def _copy(searched, tmp_path: Path) -> tuple[Path, Path]:
    cache, out = searched
    shutil.copytree(out, tmp_path / "tune")
    return cache, tmp_path / "tune"


def _fake_train(calls: list):
    """train() as _retrain calls it: a run directory holding a report.html, test accuracy 0.875."""

    def train(**kwargs):
        run_dir = Path(kwargs["models_dir"]) / "vgg16-best"
        run_dir.mkdir(parents=True)
        (run_dir / "report.html").write_text("<!DOCTYPE html><title>the run</title>\n")
        calls.append(kwargs)
        return SimpleNamespace(run_dir=run_dir, interrupted=False, metrics={"test": {"accuracy": 0.875}}, seconds=3.0)

    return train


@pytest.fixture(scope="module")
def report(searched, tmp_path_factory):
    """`featpipe tune` (no new trial) with its best retrained by the stand-in: its stdout, the search's outputs
    (out, the best leaderboard row, the run directory) and the page."""
    tmp = tmp_path_factory.mktemp("retrained")
    cache, out = _copy(searched, tmp)
    calls: list = []
    args = ["tune", str(cache), "--heads", ",".join(HEADS), "--trials", "4", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune_module, "train", _fake_train(calls))
        done = runner.invoke(app, [*args, "--models-dir", str(tmp / "models")])
    assert done.exit_code == 0, done.output + done.stderr
    best = json.loads((out / "best.json").read_text())
    assert calls and calls[0]["rnn"] == best["best"]["params"]["rnn"]
    result = SimpleNamespace(out=out, best=best["best"], run_dir=Path(best["run_dir"]), stdout=done.stdout)
    return result, Page(out / "report.html").root


def _rows(table: Node, header: bool = True) -> list[list[str]]:
    rows = [[td.text for td in tr.all(lambda n: n.tag == "td")] for tr in table.all(lambda n: n.tag == "tr")]
    return rows[1:] if header else rows


def test_tune_writes_report_html_beside_its_leaderboard_and_prints_its_path(report):
    result, _ = report
    page = result.out / "report.html"
    assert page.is_file() and (result.out / "leaderboard.csv").is_file() and not list(result.out.glob("*.tmp"))
    assert f"Report: {page}" in result.stdout.splitlines()
    (listed,) = [line for line in result.stdout.splitlines() if line.startswith("Leaderboard: ")]
    assert str(page) in listed.split(", ")


def test_the_headline_shows_the_best_score_over_folds_and_the_trials_finished_failed_pruned(report):
    result, doc = report
    card = doc.by_id("best-score")
    assert card.by_class("v")[0].text == "0.7500 +/- 0.1021"  # trial 1's fits 0.625, 0.75, 0.875
    assert "mean +/- std" in card.by_class("k")[0].text and "(cv: folds)" in doc.by_id("score-note").text
    assert doc.by_id("trials").by_class("v")[0].text == "4 / 1 / 0"
    assert doc.by_id("test-accuracy").by_class("v")[0].text == "0.8750"
    facts = dict(_rows(doc.by_class("facts")[0], header=False))
    assert facts["cache"].endswith("c.h5") and facts["backbone"].startswith("vgg16 (weights: none), 4 frames")
    assert "this run" in facts["took"] and "the best retrained in 3.0 s" in facts["took"]


def test_the_best_run_link_is_relative_and_points_at_its_report(report):
    result, doc = report
    href = doc.by_id("best-run").attrs["href"]
    assert not Path(href).is_absolute() and href.endswith("vgg16-best/report.html")
    assert (result.out / href).resolve() == (result.run_dir / "report.html").resolve()
    assert (result.out / href).is_file()


def test_trials_appear_best_first_and_the_failed_one_after_with_its_state(report):
    result, doc = report
    rows = _rows(doc.by_id("trials-table"))
    assert [int(r[1]) for r in rows] == [1, 3, 0, 2]  # by SCORES, best first
    assert [float(r[2]) for r in rows] == sorted(SCORES, reverse=True)
    header = [th.text for th in doc.by_id("trials-table").all(lambda n: n.tag == "th")]
    assert header[:4] == ["rank", "trial", "val accuracy", "std"] and header[-1] == "seconds"
    assert {"head", "lr", "dropout"} <= set(header)
    assert rows[0][header.index("head")] == result.best["params"]["rnn"]
    assert "sortable" in doc.by_id("trials-table").attrs["class"]
    failed = _rows(doc.by_id("failed-trials"))
    assert [(r[0], r[1]) for r in failed] == [("4", "fail")]


def test_the_best_configuration_is_shown_as_describe_says_it(report):
    result, doc = report
    section = doc.by_id("best-config")
    assert section.all(lambda n: n.tag == "code")[0].text == describe(result.best["params"])
    shown = dict(_rows(section.by_class("facts")[0], header=False))
    assert shown["head"] == result.best["params"]["rnn"]


def test_the_plot_of_score_against_settings_decodes_and_the_page_says_which_importance(report):
    from PIL import Image

    _, doc = report
    (image,) = doc.all(lambda n: n.tag == "img")
    head, _, payload = image.attrs["src"].partition(",")
    assert head == "data:image/png;base64"
    data = base64.b64decode(payload)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as png:
        assert png.size[0] >= 400 and png.size[1] >= 250
    assert "get_param_importances" in doc.by_id("importance-note").text
    ranked = doc.by_id("importances").text
    assert "lr" in ranked and "head" in ranked


def test_nothing_is_fetched_from_the_network_and_the_options_are_collapsed(report):
    _, doc = report
    links = [v for n in doc.all() for k, v in n.attrs.items() if k in ("src", "href") and v]
    css = " ".join(n.text for n in doc.all(lambda n: n.tag == "style"))
    links += re.findall(r"url\(([^)]*)\)", css)
    assert not [v for v in links if re.match(r"\s*['\"]?\s*(https?:)?//", v)]
    assert doc.all(lambda n: n.tag == "meta" and n.attrs.get("name") == "viewport")
    (settings,) = doc.all(lambda n: n.tag == "details")
    assert '"trials": 4' in settings.text and '"heads"' in settings.text


def test_optuna_failing_to_rank_falls_back_to_the_variance_of_per_value_means(searched, monkeypatch):
    import optuna

    from featpipe.training.study import study_trials
    from featpipe.training.tune_report import importances

    _, out = searched
    (name,) = optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")
    trials = study_trials(out / "study.db", name)
    monkeypatch.setattr(optuna.importance, "get_param_importances", lambda *a, **k: 1 / 0)
    order, how = importances(trials)
    assert "variance" in how and "division by zero" in how
    ranked = dict(order)
    assert [v for _, v in order] == sorted(ranked.values(), reverse=True)
    # units 64 (trial 1, 0.75) and 16 (trial 2, 0.25); heads: segments (0.5, 0.625) and mean (0.75, 0.25)
    assert ranked["units"] == pytest.approx(np.var([0.75, 0.25]))
    assert ranked["rnn"] == pytest.approx(np.var([0.5625, 0.5]))


def test_a_report_that_cannot_be_written_is_a_warning_and_the_search_is_kept(searched, tmp_path, monkeypatch):
    from featpipe.training.study import leaderboard, load_study

    _, out = _copy(searched, tmp_path)
    (name,) = __import__("optuna").get_all_study_names(f"sqlite:///{out / 'study.db'}")
    study = load_study(out / "study.db", name, 0)
    rows = leaderboard(study)
    result = tune_module.TuneResult(out, rows, rows[0], None, None, 0, trials=study.trials, cv="folds")
    tune_module._write_report(result)  # as the search and the retrain call it
    assert result.report == out / "report.html" == result.files["report"] and result.report.is_file()
    result.report.unlink()

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(tune_module, "write_tune_report", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        tune_module._write_report(result)
    assert result.report is None and "report" not in result.files and not (out / "report.html").exists()
    (warning,) = [w for w in caught if issubclass(w.category, RunWarning)]
    assert f"{out / 'report.html'} was not written (disk on fire)" in str(warning.message)


def test_the_cli_says_a_report_warning_in_one_line_on_stderr(tmp_path, monkeypatch):
    import featpipe

    def tune(opts):  # what tune does when report.html cannot be written: warn, and return the search
        message = "warning: x/report.html was not written (disk on fire); the search is kept."
        warnings.warn(message, RunWarning, stacklevel=2)
        return tune_module.TuneResult(tmp_path, [], None, None, None, 0, cv="folds")

    monkeypatch.setattr(featpipe, "tune", tune)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunWarning)  # the CLI turns it into a line, never a Python warning
        result = runner.invoke(app, ["tune", str(tmp_path / "c.h5"), "--no-retrain"])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stderr == "warning: x/report.html was not written (disk on fire); the search is kept.\n"
    assert "Report:" not in result.stdout


@pytest.mark.browser
def test_in_a_browser_the_search_page_shows_its_best_score_and_plot_and_fetches_nothing(report):
    """tune's page in a real headless Chromium (`make test-browser`), at laptop and phone width."""
    from browser import Browser, file_url
    from test_report_browser import IMAGES, blank

    result, _ = report
    page = file_url(result.out / "report.html")
    scripts = {
        "score": 'document.querySelector("#best-score .v").innerText',
        "images": IMAGES,
        "page_width": "document.documentElement.scrollWidth",
        "link": 'document.querySelector("#best-run").href',
    }
    browser = Browser()
    try:
        wide = browser.visit(page, width=1280, height=900, scripts=scripts)
        phone = browser.visit(page, width=390, height=844, mobile=True, scripts=scripts)
    finally:
        browser.close()
    for visit, width in ((wide, 1280), (phone, 390)):
        assert visit.values["score"] == "0.7500 +/- 0.1021"
        assert visit.values["images"] and all(w > 0 and h > 0 and shown > 0 for w, h, shown in visit.values["images"])
        assert visit.values["page_width"] <= width
        assert visit.requests[0] == page and not [u for u in visit.requests[1:] if not u.startswith("data:")]
        assert not blank(visit.screenshot)
    assert wide.values["link"] == file_url(result.run_dir / "report.html")  # the retrained run's own page
