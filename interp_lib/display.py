"""Tables and text for people: one helper that every notebook and report uses to show a table.

``il.display.table(frame, units={"drop": "nats"})`` shows numbers to a few significant figures,
integers as integers (also in float columns that only hold whole numbers, e.g. counts next to a
missing value), missing values as '—', column names with their units, full text wrapped (never
cut) and Markdown columns rendered. The result displays as HTML in Jupyter / Colab / nbconvert
and as plain text anywhere else (``print``, a terminal, a text-only viewer).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

MISSING = "—"

_CSS = ("<style>.il-table-wrap{overflow-x:auto;max-width:100%}"
        ".il-table{border-collapse:collapse;font-size:13px;margin:4px 0}"
        ".il-table th,.il-table td{border-bottom:1px solid #ddd;padding:3px 8px;vertical-align:top}"
        ".il-table th{text-align:left;background:#f4f4f4;white-space:nowrap}"
        ".il-table td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
        ".il-table td.text{overflow-wrap:break-word;text-align:left}"
        ".il-table caption{caption-side:top;text-align:left;font-weight:bold;padding:2px 0}</style>")


def format_number(value, digits: int = 3, missing: str = MISSING) -> str:
    """``value`` to ``digits`` significant figures; whole numbers without decimals; plain
    notation from 0.001 to 1e6 (``0.0183``, ``123``, ``1235``), scientific outside it."""
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 1:
        raise ValueError(f"digits={digits!r}: expected an integer >= 1")
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return missing
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    if 10 ** (digits - 1) <= abs(value) < 1e6:
        return str(round(value))  # the whole integer part, never 1230 for 1234.6
    value = float(f"{value:.{digits}g}")  # round first: 0.99996 -> 1.00, not 1.000
    magnitude = math.floor(math.log10(abs(value)))
    if not -3 <= magnitude < 6:
        return f"{value:.{digits - 1}e}"
    decimals = max(0, digits - 1 - magnitude)
    text = f"{round(value, decimals):.{decimals}f}"
    return "0" if float(text) == 0 else text


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\((https?://[^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def markdown_inline(text: str) -> str:
    """Markdown of a table cell as safe HTML: text escaped first, then code, bold, italics,
    links (http/https only), bullet lines and line breaks."""
    out = []
    for line in html.escape(str(text), quote=False).split("\n"):
        bullet = re.match(r"\s*[-*] (.*)", line)
        line = bullet.group(1) if bullet else line
        for pattern, repl in _INLINE:
            line = pattern.sub(repl, line)
        out.append(("• " if bullet else "") + line)
    return "<br>".join(out)


def markdown(text: str):
    """A Markdown text (a report, an explanation) that notebooks render instead of printing it
    raw; prints as the text itself where nothing renders Markdown."""
    from IPython.display import Markdown

    if not isinstance(text, str):
        raise TypeError(f"text: expected a str of Markdown, got {type(text).__name__}")
    return Markdown(text)


class Table:
    """A formatted table: ``.cells`` (strings, a DataFrame), HTML for notebooks
    (``_repr_html_`` / :meth:`to_html`), :meth:`to_text` and :meth:`to_markdown`."""

    def __init__(self, cells, kinds: Mapping[str, str], html_cells, caption: str | None, wrap: int):
        self.cells = cells
        self.kinds = dict(kinds)
        self._html_cells = html_cells
        self.caption = caption
        self.wrap = wrap

    def to_html(self) -> str:
        # alignment inline too: notebook front ends right-align every cell with their own CSS
        align = {c: "right" if k == "number" else "left" for c, k in self.kinds.items()}
        head = "".join(f'<th style="text-align:{align[c]}">{html.escape(str(c))}</th>' for c in self.cells.columns)
        rows = []
        for _, row in self._html_cells.iterrows():
            cells = []
            for column, value in row.items():
                kind = self.kinds[column]
                long = kind == "text" and self.cells[column].str.len().max() > self.wrap
                # short text stays on one line (a squeezed column would break words); long text
                # wraps between words within `wrap` characters
                style = ("text-align:right;white-space:nowrap" if kind == "number" else
                         f"text-align:left;white-space:normal;max-width:{self.wrap}ch;min-width:{min(30, self.wrap)}ch"
                         if long else "text-align:left;white-space:nowrap")
                cells.append(f'<td class="{"num" if kind == "number" else "text"}" style="{style}">{value}</td>')
            rows.append("<tr>" + "".join(cells) + "</tr>")
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'{_CSS}<div class="il-table-wrap"><table class="il-table">{caption}'
                f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_text(self) -> str:
        """Plain text: aligned columns, full cell text (nothing cut, no backslash wrapping)."""
        widths = {c: max([len(str(c))] + [max((len(p) for p in v.split("\n")), default=0)
                                          for v in self.cells[c]]) for c in self.cells.columns}
        def line(values):
            return "  ".join((v.rjust if self.kinds[c] == "number" else v.ljust)(widths[c])
                             for c, v in zip(self.cells.columns, values)).rstrip()
        lines = [self.caption] if self.caption else []
        lines.append(line([str(c) for c in self.cells.columns]))
        lines.append(line(["-" * widths[c] for c in self.cells.columns]))
        lines += [line([v.replace("\n", " ") for v in row]) for row in self.cells.itertuples(index=False)]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A GitHub Markdown table (pipes and line breaks in cells escaped)."""
        def cell(value):
            return str(value).replace("|", "\\|").replace("\n", "<br>")
        columns = list(self.cells.columns)
        lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
                 "|" + "|".join("---:" if self.kinds[c] == "number" else "---" for c in columns) + "|"]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.cells.itertuples(index=False)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self.cells)


_COUNT_NAME = re.compile(r"(?i)^(n|k|tp|fp|fn|tn|count|size|support|n[_ ].*|num[_ ].*|.*[_ ](count|size)|.*_n)$")


def _is_whole_column(name, values) -> bool:
    """Whole numbers to show as integers: all whole, and either beyond ±1 or in a column named
    like a count (n, k, tp / fp / fn, count, size, n_*, *_count); a 0 / 1 rate stays a rate."""
    finite = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return bool(finite) and all(math.isfinite(v) and v == int(v) for v in finite) and (
        any(abs(v) > 1 for v in finite) or bool(_COUNT_NAME.match(str(name))))


def _readable(name) -> str:
    return str(name).replace("_", " ") if isinstance(name, str) else str(name)


def table(frame, *, digits: int = 3, units: Mapping[str, str] | None = None,
          names: Mapping[str, str] | None = None, columns: Sequence[str] | None = None,
          integers: Sequence[str] = (), markdown: Sequence[str] = (), wrap: int = 60,
          missing: str = MISSING, caption: str | None = None, readable: bool = True) -> Table:
    """Format ``frame`` (a DataFrame, a list of dicts or a dict of columns) for display.

    ``digits``: significant figures of floats. ``units``: column -> unit, shown in the header
    (``drop (nats)``). ``names``: column -> header text (else ``_`` reads as a space when
    ``readable``). ``columns``: the columns to show, in order. ``integers``: columns always shown
    as whole numbers (float columns holding only whole numbers beyond ±1 are found by
    themselves). ``markdown``: text columns rendered as Markdown. ``wrap``: widest text column
    in characters before the text wraps (it is never cut). ``missing``: shown for None / NaN.
    A named or non-default index becomes the first column(s).
    """
    import pandas as pd

    if isinstance(frame, pd.Series):
        frame = frame.to_frame()
    if not isinstance(frame, pd.DataFrame):
        try:
            frame = pd.DataFrame(frame)
        except (TypeError, ValueError) as error:
            raise TypeError(f"frame: expected a DataFrame, a list of dicts or a dict of columns "
                            f"({error})") from None
    if not isinstance(wrap, int) or wrap < 8:
        raise ValueError(f"wrap={wrap!r}: expected an integer >= 8 (characters)")
    if not isinstance(frame.index, pd.RangeIndex) or any(n is not None for n in frame.index.names):
        unnamed = frame.index.nlevels == 1 and frame.index.name is None and "" not in frame.columns
        frame = frame.reset_index()
        if unnamed:  # row labels without a name: a blank header, not "index"
            frame = frame.rename(columns={"index": ""})
    if columns is not None:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise ValueError(f"columns={list(columns)!r}: {unknown} not in the table; it has {list(frame.columns)}")
        frame = frame[list(columns)]
    for argument, given in (("units", units or {}), ("names", names or {}), ("integers", integers),
                            ("markdown", markdown)):
        unknown = [c for c in given if c not in frame.columns]
        if unknown:
            raise ValueError(f"{argument}: {unknown} not in the table; it has {list(frame.columns)}")
    units, names = dict(units or {}), dict(names or {})
    text_cells, html_cells, kinds = {}, {}, {}
    for column in frame.columns:
        values = frame[column].tolist()
        numeric = all(v is None or (isinstance(v, Real) and not isinstance(v, bool)) or
                      (isinstance(v, float) and math.isnan(v)) for v in values) and any(
            v is not None for v in values)
        header = names.get(column, _readable(column) if readable else str(column))
        if column in units:
            header = f"{header} ({units[column]})"
        if header in kinds:
            raise ValueError(f"two columns would show as {header!r}; pass names= to tell them apart")
        if numeric:
            whole = column in integers or _is_whole_column(column, values)
            shown = [format_number(None if v is None else (round(float(v)) if whole and
                                   not math.isnan(float(v)) else v), digits, missing) for v in values]
            kinds[header] = "number"
            text_cells[header], html_cells[header] = shown, [html.escape(v) for v in shown]
        else:
            shown = [missing if v is None or (isinstance(v, float) and math.isnan(v)) else
                     format_number(v, digits, missing) if isinstance(v, (Real, bool)) else
                     ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in values]
            kinds[header] = "text"
            text_cells[header] = shown
            html_cells[header] = [markdown_inline(v) if column in markdown else
                                  html.escape(v, quote=False).replace("\n", "<br>") for v in shown]
    return Table(pd.DataFrame(text_cells), kinds, pd.DataFrame(html_cells), caption, wrap)
