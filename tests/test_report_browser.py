"""report.html opened in a real headless Chromium, checked for what is on the screen.

Marked ``browser``: `make test-browser` installs Debian's chromium and runs them (CI does); `make test`
does not. The page comes from the same kind of run as tests/test_report.py: a small synthetic cache whose
clips are real mp4 files, trained, then scored on a test split.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe
from browser import Browser, file_url
from featpipe.cli import app
from test_report import make_run

pytestmark = [pytest.mark.browser, pytest.mark.filterwarnings("ignore::featpipe.errors.RunWarning")]
runner = CliRunner()

# every image on the page: decoded by the browser, with its natural and shown sizes
IMAGES = """Promise.all(Array.from(document.images).map(function(i){
  return i.decode().then(function(){return [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]},
                         function(){return [0, 0, 0]});}))"""


def blank(png: bytes) -> bool:
    """True when a screenshot is (almost) one colour: nothing was drawn."""
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img is not None, "the screenshot is not a PNG"
    values, counts = np.unique(img, return_counts=True)
    return counts.max() / img.size > 0.995 or float(img.std()) < 2.0


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A trained run, evaluated on its test split through the CLI, and its report rebuilt."""
    run_dir = make_run(tmp_path_factory.mktemp("browser"))[0]
    out = runner.invoke(app, ["evaluate", str(run_dir), "--split", "test", "--json"])
    assert out.exit_code == 0, out.output
    featpipe.report(run_dir)
    return run_dir, json.loads(out.stdout)


def test_at_laptop_width_the_page_shows_evaluates_accuracy_every_image_and_fetches_nothing(browser, scored_run):
    run_dir, metrics = scored_run
    page = file_url(run_dir / "report.html")
    visit = browser.visit(
        page,
        width=1280,
        height=900,
        scripts={
            "label": 'document.querySelector("#accuracy .k").innerText',
            "accuracy": 'document.querySelector("#accuracy .v").innerText',
            "f1": 'document.querySelector("#macro-f1 .v").innerText',
            "card": 'JSON.stringify(document.querySelector("#accuracy").getBoundingClientRect())',
            "images": IMAGES,
        },
    )
    assert visit.values["label"] == "Test accuracy"
    assert visit.values["accuracy"] == f"{metrics['accuracy']:.4f}"
    assert visit.values["f1"] == f"{metrics['macro_f1']:.4f}"
    card = json.loads(visit.values["card"])
    assert card["width"] > 0 and 0 <= card["top"] < 900  # on the first screen, not hidden
    images = visit.values["images"]
    assert len(images) >= 3  # curves, confusion matrix, thumbnails of misclassified clips
    assert all(w > 0 and h > 0 and shown > 0 for w, h, shown in images), images
    assert visit.requests[0] == page
    assert [u for u in visit.requests[1:] if not u.startswith("data:")] == []
    assert not blank(visit.screenshot)


def test_on_a_phone_nothing_overflows_the_screen(browser, scored_run):
    run_dir, metrics = scored_run
    visit = browser.visit(
        file_url(run_dir / "report.html"),
        width=390,
        height=844,
        mobile=True,
        scripts={
            "page_width": "document.documentElement.scrollWidth",
            "viewport": "window.innerWidth",
            "widest_image": "Math.max(...Array.from(document.images).map(i => i.getBoundingClientRect().right))",
            "accuracy": 'document.querySelector("#accuracy .v").innerText',
        },
    )
    assert visit.values["viewport"] == 390
    assert visit.values["page_width"] <= 390  # wide tables scroll inside their box, the page does not
    assert visit.values["widest_image"] <= 390
    assert visit.values["accuracy"] == f"{metrics['accuracy']:.4f}"
    assert not blank(visit.screenshot)


def test_clicking_a_column_header_sorts_the_per_class_table(browser, scored_run):
    run_dir, metrics = scored_run
    rows = (
        'Array.from(document.querySelectorAll("#per-class tbody tr"))'
        ".map(r => [r.cells[0].innerText, r.cells[3].innerText])"
    )
    click_f1 = (
        'Array.from(document.querySelectorAll("#per-class th")).find(t => t.innerText.trim().startsWith("F1")).click()'
    )
    visit = browser.visit(
        file_url(run_dir / "report.html"),
        scripts={"before": rows, "up": f"{click_f1}; {rows}", "down": f"{click_f1}; {rows}"},
    )
    shown = {name: f"{metrics['per_class'][name]['f1']:.4f}" for name in metrics["class_names"]}
    assert dict(visit.values["before"]) == shown
    up = [float(f1) for _, f1 in visit.values["up"]]
    down = [float(f1) for _, f1 in visit.values["down"]]
    assert up == sorted(up) and down == sorted(down, reverse=True)
    assert dict(visit.values["down"]) == shown  # same rows, moved together


def test_the_checks_catch_a_page_that_fetches_from_the_network_or_draws_nothing(browser, tmp_path):
    """The same checks on pages built to fail them: a web image is seen as a request, white as blank."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><p>x</p><img src="http://example.invalid/a.png"></body></html>')
    visit = browser.visit(file_url(bad), scripts={"images": IMAGES})
    assert "http://example.invalid/a.png" in visit.requests
    assert visit.values["images"] == [[0, 0, 0]]
    empty = tmp_path / "empty.html"
    empty.write_text("<html><body></body></html>")
    assert blank(browser.visit(file_url(empty)).screenshot)
