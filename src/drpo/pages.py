"""The report pages `drpo inspect` and `drpo report` write: Markdown tables, and report.md
with report.html, the same page made self-contained (rendered from the Markdown, figures
inlined), so the two never disagree."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Sequence

import markdown

from drpo.files import atomic_write

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;"
         "padding:3px 8px}th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:.6em}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def write_page(out: Path, md: str, title: str) -> dict[str, Path]:
    """OUT/report.md and OUT/report.html, the same page self-contained: PNGs (relative to `out`)
    inlined as data URIs. Written atomically; returns their paths by name."""

    def inline(m: re.Match) -> str:
        data = base64.b64encode((out / m.group(2)).read_bytes()).decode("ascii")
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", inline, md),
                             extensions=["tables", "fenced_code"])
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    atomic_write(paths["markdown"], md, "report")
    atomic_write(paths["html"], f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                 f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n", "report")
    return paths
