"""The report's document model: a list of blocks, rendered as a self-contained HTML page or as Markdown.

A block is a tuple, one of::

    ("h2", text)                      section heading
    ("p", text)                       paragraph
    ("facts", [(key, value), ...])    two-column key/value table
    ("table", headers, rows)          table (rows: lists of strings)
    ("img", file name, caption)       figure, referenced by its file name relative to the page
    ("list", items)                   bulleted list

All text is escaped (HTML) or made table-safe (Markdown); no block carries markup.
"""

from __future__ import annotations

import html
from typing import Optional, Sequence

Block = tuple

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ddd;"
          "padding:4px 8px;text-align:left}thead th{background:#f3f3f3}table.facts th{background:#f8f8f8}"
          "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}")


def pct(fraction: Optional[float]) -> str:
    """``0.4766`` -> ``"47.66%"``; ``None`` -> ``"-"``."""
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def number(value: Optional[float], fmt: str) -> str:
    """``value`` formatted with ``fmt`` (a ``str.format`` pattern), or ``"-"`` for ``None``."""
    return "-" if value is None else fmt.format(value)


def duration(seconds: float) -> str:
    """``"20.7 s"``, ``"12.5 min"`` or ``"3.20 h"``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def images(blocks: Sequence[Block]) -> list[str]:
    """File names of the figures the document references, in order."""
    return [b[1] for b in blocks if b[0] == "img"]


def _alt(file_name: str) -> str:
    """Short alternative text of a figure: ``"choice_map.png"`` -> ``"choice map"``."""
    return file_name.rsplit(".", 1)[0].replace("_", " ")


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """Self-contained HTML page (inline CSS, images referenced by relative file name)."""
    e = html.escape
    parts = []
    for b in blocks:
        if b[0] == "h2":
            parts.append(f"<h2>{e(b[1])}</h2>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "facts":
            parts.append("<table class=facts>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in b[1])
                         + "</table>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            parts.append(f'<figure><img src="{e(b[1])}" alt="{e(_alt(b[1]))}"><figcaption>{e(b[2])}</figcaption>'
                         "</figure>")
        elif b[0] == "list":
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body><h1>{e(title)}</h1>\n{body}\n</body></html>\n")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The same document as Markdown (GitHub tables, images by relative file name)."""

    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])

    parts = [f"# {title}"]
    for b in blocks:
        if b[0] == "h2":
            parts.append(f"## {b[1]}")
        elif b[0] == "p":
            parts.append(b[1])
        elif b[0] == "facts":
            parts.append(table(["", ""], [[f"**{k}**", v] for k, v in b[1]]))
        elif b[0] == "table":
            parts.append(table(b[1], b[2]))
        elif b[0] == "img":
            parts.append(f"![{_alt(b[1])}]({b[1]})\n\n*{b[2]}*")
        elif b[0] == "list":
            parts.append("\n".join(f"- {i}" for i in b[1]))
    return "\n\n".join(parts) + "\n"


