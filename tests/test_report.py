"""report.html: one self-contained page per run, checked as a person reads it (parsed with html.parser).

One tiny run serves every test: a synthetic cache (no backbone) whose clips are real mp4 files under its
data_root, trained without a test split (the page says validation); test clips are then added to the cache,
and `featpipe report` rebuilds the page about them.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe
from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.cli import app
from featpipe.errors import RunWarning
from featpipe.runs.evaluate import evaluate
from featpipe.training.train import train
from videos import write_video

# the test clips are added after training: every score on them comes with a "cache has changed" RunWarning
pytestmark = pytest.mark.filterwarnings("ignore::featpipe.errors.RunWarning")
runner = CliRunner()
CLASSES = ("a", "b", "c")
T, D = 4, 6


# ----------------------------------------------------------------------------- a small DOM of the page


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    @property
    def text(self) -> str:
        return "".join(c.text if isinstance(c, Node) else c for c in self.children)

    def all(self, pred=lambda n: True) -> list["Node"]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                out += [c] if pred(c) else []
                out += c.all(pred)
        return out

    def by_id(self, id_: str) -> "Node":
        (node,) = self.all(lambda n: n.attrs.get("id") == id_)
        return node

    def by_class(self, cls: str) -> list["Node"]:
        return self.all(lambda n: cls in (n.attrs.get("class") or "").split())


class Page(HTMLParser):
    VOID = {"meta", "img", "br", "link", "input", "hr", "source"}

    def __init__(self, path: Path):
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def page(run_dir: Path) -> Node:
    return Page(run_dir / "report.html").root


def headline(doc: Node, key: str) -> tuple[str, str]:
    """(label, value) of a headline card, as shown."""
    card = doc.by_id(key)
    return card.by_class("k")[0].text, card.by_class("v")[0].text


def clips(doc: Node) -> list[Node]:
    return doc.by_id("misclassified").by_class("clip")


# ----------------------------------------------------------------------------- the run


def _append(cache: Path, data: Path, split: str, n: int, seed: int, signal: float) -> None:
    config = CacheConfig(
        "vgg16", "none", "fp", 32, T, "uniform", "float32", (D,), CLASSES, extra={"data_root": str(data)}
    )
    rng = np.random.default_rng(seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    writer = CacheWriter(cache, config)
    for i in range(n):
        label = i % len(CLASSES)
        key = f"{split}/{CLASSES[label]}/{split}_{i:03d}.mp4"
        write_video(data / key, 6, 48, 48)
        feats = rng.normal(0, 1, (T, D)).astype(np.float32)
        feats[:, label] += signal
        writer.append(ClipRecord(key, label, split, T, feats, np.ones(T, bool)))
    writer.finalize()


def make_run(root: Path):
    """A run trained on a cache without test clips (its page is about val), then test clips added: (run_dir,
    cache, data, the page train wrote, evaluate's val metrics). tests/test_report_browser.py uses it too."""
    data, cache = root / "data", root / "cache" / "vgg16.h5"
    _append(cache, data, "train", 18, 0, 1.5)
    _append(cache, data, "val", 9, 1, 1.5)
    models = root / "models"
    result = train(cache=cache, head="mean", models_dir=models, epochs=2, patience=2, quiet=True, refit=False)
    trained_page = (result.run_dir / "report.html").read_text(encoding="utf-8")
    val = evaluate(result.run_dir, split="val")
    _append(cache, data, "test", 24, 2, 0.0)  # noise: most test clips are misclassified
    return result.run_dir, cache, data, trained_page, val


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"))


def test_train_writes_the_page_about_validation_when_the_cache_has_no_test_split(run, tmp_path):
    run_dir, _, _, trained_page, val = run
    (tmp_path / "report.html").write_text(trained_page)
    doc = page(tmp_path)
    assert headline(doc, "accuracy") == ("Validation accuracy", f"{val['accuracy']:.4f}")
    assert headline(doc, "macro-f1") == ("Validation macro F1", f"{val['macro_f1']:.4f}")
    assert headline(doc, "clips") == ("Validation clips", "9")
    assert "this cache has no test clips" in doc.by_id("split-note").text
    assert doc.all(lambda n: n.tag == "meta" and n.attrs.get("name") == "viewport")


def test_featpipe_report_after_evaluate_split_test_says_test_and_matches_evaluate(run):
    run_dir = run[0]
    out = runner.invoke(app, ["evaluate", str(run_dir), "--split", "test", "--json"])
    assert out.exit_code == 0, out.output
    metrics = json.loads(out.stdout)
    out = runner.invoke(app, ["report", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert f"Report: {run_dir / 'report.html'}" in out.stdout
    doc = page(run_dir)
    assert headline(doc, "accuracy") == ("Test accuracy", f"{metrics['accuracy']:.4f}")
    assert headline(doc, "clips") == ("Test clips", "24")
    assert "test split" in doc.by_id("split-note").text


def test_every_image_is_inline_and_decodes_and_nothing_is_fetched(run):
    run_dir = run[0]
    featpipe.report(run_dir)
    doc = page(run_dir)
    images = doc.all(lambda n: n.tag == "img")
    assert len(images) >= 3  # curves, confusion matrix, thumbnails
    for img in images:
        head, _, payload = img.attrs["src"].partition(",")
        assert re.fullmatch(r"data:image/(png|jpeg);base64", head), head
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.size > 0
    links = [v for n in doc.all() for k, v in n.attrs.items() if k in ("src", "href") and v]
    css = " ".join(n.text for n in doc.all(lambda n: n.tag == "style"))
    links += re.findall(r"url\(([^)]*)\)", css)
    assert not [v for v in links if re.match(r"\s*['\"]?\s*(https?:)?//", v)]


def test_the_per_class_table_has_one_row_per_class(run):
    run_dir = run[0]
    featpipe.report(run_dir)
    table = page(run_dir).by_id("per-class")
    rows = [r for r in table.all(lambda n: n.tag == "tr") if r.all(lambda n: n.tag == "td")]
    assert [r.all(lambda n: n.tag == "td")[0].text for r in rows] == list(CLASSES)
    assert "sortable" in table.attrs["class"]


def test_misclassified_clips_come_worst_first_and_a_cap_says_so(run):
    run_dir, cache, data = run[:3]
    metrics = evaluate(run_dir, split="test")
    wrong = metrics["n"] - sum(metrics["confusion_matrix"][i][i] for i in range(len(CLASSES)))
    assert wrong > 3
    featpipe.report(run_dir, worst=3)
    doc = page(run_dir)
    shown = clips(doc)
    assert len(shown) == 3
    assert doc.by_id("clips-note").text.startswith(f"The worst 3 of {wrong} misclassified clips")
    top = [float(c.by_class("prob")[0].text) for c in shown]
    assert top == sorted(top, reverse=True)
    for c in shown:
        assert c.by_class("true")[0].text in CLASSES
        assert Path(c.all(lambda n: n.tag == "code")[0].text).parents[1] == data / "test"
        assert c.all(lambda n: n.tag == "img")


def test_a_deleted_clip_is_listed_without_thumbnails(run, tmp_path):
    run_dir = run[0]
    featpipe.report(run_dir)
    first = Path(clips(page(run_dir))[0].all(lambda n: n.tag == "code")[0].text)
    shutil.move(first, tmp_path / "away.mp4")
    try:
        featpipe.report(run_dir)
    finally:
        shutil.move(tmp_path / "away.mp4", first)
    entry = clips(page(run_dir))[0]
    assert entry.all(lambda n: n.tag == "code")[0].text == str(first)
    assert not entry.all(lambda n: n.tag == "img")
    assert "No thumbnails: the clip is no longer there" in entry.text


def test_a_report_that_cannot_be_written_is_a_warning_and_the_run_is_kept(run, tmp_path, monkeypatch):
    import featpipe.runs.report as report

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(report, "report_from_index", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        result = train(cache=run[1], head="mean", models_dir=tmp_path, epochs=1, quiet=True, refit=False)
    assert result.report is None and (result.run_dir / "model.keras").is_file()
    assert not (result.run_dir / "report.html").exists()
    assert any("report.html was not written (disk on fire)" in str(w.message) for w in caught)


def test_a_refit_run_without_a_test_split_shows_trains_own_val_scores_and_says_why(tmp_path):
    """val was trained on by the refit, so it cannot be scored again: the page keeps train's val scores."""
    from caches import synthetic_cache

    # 6 train clips a class: refit on train + val by default
    cache = synthetic_cache(tmp_path / "c.h5", splits=("train", "val"), classes=("a", "b", "c"), n=36)
    result = train(cache=cache, head="mean", models_dir=tmp_path / "models", epochs=1, quiet=True)
    assert result.refit_epochs == 1 and result.report == result.run_dir / "report.html"
    doc = page(result.run_dir)
    assert headline(doc, "accuracy") == ("Validation accuracy", f"{result.metrics['val']['accuracy']:.4f}")
    assert any("Per-clip results are not shown" in n.text for n in doc.by_class("note"))
    assert not doc.all(lambda n: n.attrs.get("id") == "misclassified")
