"""Text for a terminal: cells that cannot carry escape sequences, and tables that fit a line width.

Whatever a store holds (a model name with an ANSI escape, a path of 300 characters, a reason with
newlines) prints as one line of visible characters, cut with an ellipsis to the column's width.

Example:
    >>> print(fit_table([{"name": "zoo:code-classifier-deep", "n": 3}],
    ...                 [Column("name", "model"), Column("n", "runs", 4)], width=20))
    model           runs
    zoo:code-clas…  3
"""

from __future__ import annotations

import math
import textwrap
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TERMINAL_WIDTH = 100  # characters per line of the CLI's default tables and prose (issue 17)
MIN_WIDTH = 8  # a flexible column is never cut narrower than this
GAP = "  "  # between two columns
ELLIPSIS = "…"


def printable(value: Any) -> str:
    """``value`` as one line a terminal shows as typed: whitespace (newlines, tabs) becomes a space, other
    non-printable characters (ESC, BEL, bidirectional overrides) become '?'; None and NaN become ''.

    Example:
        >>> printable("gpt2\\x1b]0;pwned\\x07\\nnext")
        'gpt2?]0;pwned? next'
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "".join(ch if ch.isprintable() else " " if ch.isspace() else "?" for ch in str(value))


def text_width(text: str) -> int:
    """Terminal columns ``text`` takes: two for wide (CJK) characters, one for any other (so it is never
    less than ``len(text)``)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def clip(text: str, width: int, middle: bool = False) -> str:
    """``text`` within ``width`` columns; a cut one ends with an ellipsis (``middle``: keeps both ends,
    for paths and model ids whose end tells them apart).

    Example:
        >>> clip("speculative decoding", 12), clip("/tmp/drafts/smollm2-2l", 12, middle=True)
        ('speculative…', '/tmp/…lm2-2l')
    """
    if text_width(text) <= width:
        return text
    if middle:
        tail = _fit(text[::-1], width - 1 - (width - 1) // 2)[::-1]  # the end gets the larger half
        return _fit(text, width - 1 - text_width(tail)) + ELLIPSIS + tail
    return _fit(text, width - 1) + ELLIPSIS


def _fit(text: str, width: int) -> str:
    """The longest start of ``text`` within ``width`` columns."""
    used = 0
    for end, ch in enumerate(text):
        used += text_width(ch)
        if used > width:
            return text[:end]
    return text


def wrap_line(line: str, width: int = TERMINAL_WIDTH) -> list[str]:
    """One printable prose line wrapped at ``width``: a bullet (``  - item``) continues under its text,
    other lines two spaces further in; a word longer than the line is broken.

    Example:
        >>> wrap_line("  - the leader (1.79x, 1.31-2.45x); 2 other candidates overlap", 30)
        ['  - the leader (1.79x,', '    1.31-2.45x); 2 other', '    candidates overlap']
    """
    text = printable(line)
    body = text.lstrip(" ")
    lead = text[: len(text) - len(body)]
    bullet = "- " if body.startswith("- ") else ""
    follow = lead + (" " * len(bullet) if bullet else "  ")
    return textwrap.wrap(body[len(bullet):], width, initial_indent=lead + bullet, subsequent_indent=follow,
                         break_on_hyphens=False) or [""]


@dataclass(frozen=True)
class Column:
    """One column of :func:`fit_table`."""

    key: str  # the row's key whose value the column shows
    header: str  # the column's title
    width: int | None = None  # the most characters it takes (longer cells cut); None: flexible, cut to fit
    middle: bool = False  # cut in the middle (identifiers, paths) instead of at the end (prose)

    def __post_init__(self) -> None:
        if self.width is not None and self.width < 1:
            raise ValueError(f"column {self.key!r} has width={self.width}: give a positive width or None")


def fit_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], width: int = TERMINAL_WIDTH) -> str:
    """A left-aligned table, header first, whose every line is at most ``width`` characters.

    A column is as wide as its widest cell (a fixed one at most its ``width``); while the line is too
    long the widest flexible column gives up a character, down to :data:`MIN_WIDTH`.

    Raises:
        ValueError: when the fixed widths and the flexible columns' minimum cannot fit ``width``.
    """
    # 1. Cells as one printable line each.
    headers = [printable(c.header) for c in columns]
    cells = [[printable(row.get(c.key)) for c in columns] for row in rows]
    # 2. Natural widths, and the narrowest the columns can go.
    widths = [max([text_width(headers[i]), *(text_width(r[i]) for r in cells)]) for i in range(len(columns))]
    widths = [min(w, c.width) if c.width else w for w, c in zip(widths, columns)]
    gaps = len(GAP) * (len(columns) - 1)
    floor = sum(c.width or MIN_WIDTH for c in columns) + gaps
    if floor > width:
        raise ValueError(f"these columns need {floor} characters, more than width={width}: "
                         "drop a column or make the fixed ones narrower")
    # 3. The widest flexible column gives up a character until the line fits.
    flexible = [i for i, c in enumerate(columns) if c.width is None]
    while sum(widths) + gaps > width:
        widest = max(flexible, key=widths.__getitem__)
        widths[widest] -= 1
    # 4. The lines.
    def line(texts: list[str]) -> str:
        parts = [clip(t, w, c.middle) for t, w, c in zip(texts, widths, columns)]
        return GAP.join(p + " " * (w - text_width(p)) for p, w in zip(parts, widths)).rstrip()

    return "\n".join(line(texts) for texts in [headers, *cells])
