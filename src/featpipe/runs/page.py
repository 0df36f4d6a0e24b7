"""The machinery of featpipe's self-contained HTML pages (a run's report.html, tune's report.html).

One page is one file that opens offline in any browser: the CSS is inline, images are inline
(base64 ``data:`` URIs), a few lines of inline JavaScript sort the tables of class ``sortable``, and
nothing is fetched from the network (no font, no script, no stylesheet). The layout is one column that
reads at a laptop's width and on a phone's (the viewport meta tag; wide tables scroll sideways).
"""

from __future__ import annotations

import base64
import html
import json

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d1d1f;
margin:0 auto;max-width:72rem;padding:1rem;line-height:1.45}
h1{font-size:1.4rem;margin:.2rem 0 .8rem;word-break:break-word}h2{font-size:1.15rem;margin-top:2rem}
img{max-width:100%;height:auto}.scroll{overflow-x:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(11rem,1fr));gap:.6rem}
.card{border:1px solid #d8d8de;border-radius:6px;padding:.5rem .7rem}.card .k{color:#666;font-size:.85rem}
.card .v{font-size:1.5rem;font-weight:600}.facts td:first-child{color:#666;white-space:nowrap}
table{border-collapse:collapse;font-size:.92rem}th,td{padding:.3rem .6rem;border-bottom:1px solid #e3e3e8;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#999}
.clip{border-top:1px solid #e3e3e8;padding:.6rem 0}.clip img{image-rendering:auto;display:block}
code{word-break:break-all;font-size:.85rem}.note{color:#8a5a00}pre{overflow-x:auto;font-size:.8rem}
"""

JS = """document.querySelectorAll("table.sortable th").forEach(function(th,i){th.addEventListener("click",function(){
var b=th.closest("table").tBodies[0],r=Array.from(b.rows),up=th.dataset.dir!=="up";th.dataset.dir=up?"up":"down";
r.sort(function(p,q){var x=p.cells[i].textContent,y=q.cells[i].textContent,m=parseFloat(x),n=parseFloat(y);
var c=isNaN(m)||isNaN(n)?x.localeCompare(y):m-n;return up?c:-c;});r.forEach(function(e){b.appendChild(e);});});});"""

__all__ = ["CSS", "JS", "cards", "details", "document", "duration", "esc", "facts", "img", "num", "table"]


def esc(value) -> str:
    """``value`` as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def img(data: bytes, mime: str, alt: str) -> str:
    """An inline image (a ``data:`` URI): the page stays one file."""
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}">'


def duration(seconds: float) -> str:
    seconds = float(seconds or 0)
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def document(title: str, body: list[str]) -> str:
    """The whole page: head (charset, viewport, title, CSS), the body's parts, then the sorting script."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        *body,
        f"<script>{JS}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def cards(items: list[tuple[str, str, str]]) -> str:
    """Headline cards: (id, label, value) each."""
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card" id="{esc(k)}"><div class="k">{esc(label)}</div><div class="v">{esc(v)}</div></div>'
            for k, label, v in items
        )
        + "</div>"
    )


def facts(rows: list[tuple[str, str]], raw: frozenset[str] = frozenset()) -> str:
    """A two-column table of (name, value); values are escaped unless their name is in ``raw`` (ready HTML)."""
    body = "".join(f"<tr><td>{esc(k)}</td><td>{v if k in raw else esc(v)}</td></tr>" for k, v in rows)
    return f'<div class="scroll"><table class="facts">{body}</table></div>'


def table(id_: str, header: list[str], rows: list[list[tuple[str, bool]]], sortable: bool = True) -> str:
    """A table that scrolls sideways on a phone: ``rows`` of (text, numeric) cells; numeric cells align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{esc(t)}</td>' if n else f"<td>{esc(t)}</td>" for t, n in row) + "</tr>"
        for row in rows
    )
    cls = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{cls} id="{esc(id_)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def details(summary: str, data) -> str:
    """``data`` as indented JSON in a collapsed section."""
    text = json.dumps(data, indent=2, default=str)
    return f"<details><summary>{esc(summary)}</summary><pre>{html.escape(text, quote=False)}</pre></details>"
