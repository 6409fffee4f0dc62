"""One self-contained HTML report per study: figures embedded as base64 PNG, all text escaped."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from icl_lab.atomic import atomic_write

__all__ = ["Section", "render", "table_html", "write_report"]

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { font-size: 0.95em; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.text { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #b42318; font-weight: 600; }
.unclear { color: #9a6700; font-weight: 600; }
"""


@dataclass
class Section:
    """A heading, a paragraph (plain text, escaped), optional figures (PNG paths) and tables."""

    title: str
    text: str = ""
    figures: list[Path] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "<td>–</td>"
        return f"<td>{value:.4g}</td>"
    text = html.escape(str(value))
    cls = {"pass": "pass", "fail": "fail", "unclear": "unclear"}.get(str(value).lower())
    return f'<td class="{cls}">{text}</td>' if cls else f'<td class="text">{text}</td>'


def table_html(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render(title: str, intro: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>{html.escape(intro)}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for fig in s.figures:
            parts.append(f"<figure>{_img(fig)}</figure>")
        if s.text:
            parts.append("".join(f"<p class='note'>{html.escape(p)}</p>" for p in s.text.split("\n\n")))
        parts.extend(table_html(t) for t in s.tables)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, intro: str, sections: list[Section]) -> Path:
    """Render and write the report atomically; returns its path."""
    path = Path(path)
    text = render(title, intro, sections)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path
