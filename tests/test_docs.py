"""README.md is a short front door, and every relative link in it and in docs/ leads somewhere.

A link ``[text](path)`` must name an existing file or folder (relative to the page it is on), and
``[text](path#anchor)`` or ``[text](#anchor)`` a heading of that page, slugged the way GitHub does.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)


def _prose(text: str) -> str:
    """The page without fenced code blocks, where ``#`` and ``](`` are not markdown."""
    return _FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the text as rendered (no code marks, a link's own text),
    lower case, every character but letters, digits, ``_``, ``-`` and spaces dropped, spaces turned
    into ``-``."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's ``-1``, ``-2`` ... for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_prose(page.read_text())):
        slug = github_slug(heading)
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        found.add(slug)
    return found


def relative_links(page: Path) -> list[str]:
    """Link targets of a page that point inside the repository (not http:, mailto:, ...)."""
    prose = _CODE_SPAN.sub("", _prose(page.read_text()))
    return [t for t in _LINK_TARGET.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.is_dir() or dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    return broken


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text into docs/"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    assert relative_links(page) or page.name != "README.md", "no link found: the link pattern is broken"
    assert not broken_links(page), f"broken links in {page.relative_to(ROOT)}: {broken_links(page)}"


def test_every_docs_page_is_reachable_from_the_index():
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in relative_links(index)}
    orphans = [p.name for p in PAGES if p.parent == index.parent and p != index and p.resolve() not in linked]
    assert not orphans, f"docs/README.md does not link {orphans}"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("`featpipe predict CLIP [CLIP|DIR ...]`", "featpipe-predict-clip-clipdir-"),
        ("Refit on train + val", "refit-on-train--val"),
        ("Temporal augmentation (`--frames`)", "temporal-augmentation---frames"),
        ("The cache (`cache/<backbone>.h5`), schema version 3", "the-cache-cachebackboneh5-schema-version-3"),
    ],
)
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def shell_examples(page: Path) -> list[str]:
    """The lines of a page's ``bash`` (or unlabelled) code blocks that run ``featpipe COMMAND ...``.

    Each line is cut at its comment and at ``&&``, ``|``, ``;``, ``&``; lines continued with ``\\`` are joined.
    """
    lines, lang, block = [], None, []
    for line in page.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lang is None:
            lang, block = fence.group(1) or "text", []
        elif fence:
            if lang in ("bash", "sh", "text"):
                lines.extend(" ".join(block).replace("\\ ", " ").split("\n"))
            lang = None
        elif lang is not None:
            block.append(re.split(r"(?:^|\s)#", line)[0].rstrip() + ("\n" if not line.rstrip().endswith("\\") else ""))
    commands = []
    for line in lines:
        for part in re.split(r"&&|\|\||[;|&]", line):
            words = part.split()
            names = [w.rsplit("/", 1)[-1] for w in words]
            if "featpipe" in names:
                commands.append(" ".join(words[names.index("featpipe") :]))
    return commands


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_command_example_uses_flags_the_command_takes(page):
    """A renamed or removed flag fails here until the examples in README and docs/ change with it.

    Hidden flags (`train --rnn`, kept for old scripts) count as not taken: the docs show what `--help` shows.
    """
    from typer.main import get_command

    from featpipe.cli import app

    commands = get_command(app).commands
    wrong = []
    for example in shell_examples(page):
        words = example.split()[1:]
        while words and words[0].startswith("-"):  # featpipe --verbose COMMAND
            words.pop(0)
        if not words or words[0] in ("COMMAND",):
            continue
        if words[0] not in commands:
            wrong.append(f"{example}: no command {words[0]!r}")
            continue
        shown = [p for p in commands[words[0]].params if not getattr(p, "hidden", False)]
        flags = {o for p in shown for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        wrong += [f"{example}: {w}" for w in words[1:] if re.match(r"^--?[a-z]", w) and w.split("=")[0] not in flags]
    assert not wrong, f"examples in {page.relative_to(ROOT)} use what `featpipe` does not take: {wrong}"
