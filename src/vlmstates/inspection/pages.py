"""Small self-contained HTML pages for the workflow's report: the inspection page and the tables.

Snakemake's report opens an HTML file as it is, while a CSV is only offered for download; so every
table the report shows is also written as a page. Pages carry their own style and no scripts.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

STYLE = """body{font-family:system-ui,sans-serif;font-size:14px;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.4em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f0f0f0;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}.note{color:#666}
.bad{color:#b00020;font-weight:600}.good{color:#1b5e20;font-weight:600}.warn{color:#b35c00;font-weight:600}table.data td{white-space:nowrap}"""


def esc(value) -> str:
    """Escaped text of a cell; None and NaN show as empty (an unknown, not a value)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def cell(value, digits: int = 3) -> str:
    if _is_number(value):
        shown = value if isinstance(value, (int, np.integer)) else _format_float(float(value), digits)
        return f'<td class="n">{esc(shown)}</td>'
    return f"<td>{esc(value)}</td>"


def _format_float(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def table(header, rows, digits: int = 3, css_class: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v, digits) for v in row) + "</tr>" for row in rows)
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}><tr>{head}</tr>{body}</table>"


def frame_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A data frame as a table, numbers right-aligned and rounded to `digits` decimals, one line per row
    (a wide table scrolls sideways rather than wrapping every cell into a tall row)."""
    rows = frame.astype(object).where(frame.notna(), None).itertuples(index=False)
    return table(list(frame.columns), rows, digits, css_class="data")


def page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def table_page(frame: pd.DataFrame, title: str, note: str = "", first=()) -> str:
    """A whole table as one page: a heading, an optional note, the rows; the columns named in `first`
    (those present) lead, so that what a reader looks for is on screen without scrolling."""
    leading = [c for c in first if c in frame.columns]
    frame = frame[leading + [c for c in frame.columns if c not in leading]]
    intro = f'<p class="note">{esc(note)}</p>' if note else ""
    return page(title, f"<h1>{esc(title)}</h1>{intro}<p>{len(frame)} rows.</p>{frame_table(frame)}")
