"""Shared plumbing of the panels: opening the store, showing figures, error lines and tables.

Output widgets are written through their ``outputs`` trait (never ``with output:``), which works the
same from a background thread, from a test without a kernel, and in JupyterLab.
"""

from __future__ import annotations

import functools
import html
import json
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as W


def open_store(store: Any = None) -> Any:
    """A :class:`workbench.store.Store` from None (the default store), a URL or a Store."""
    from workbench.store import Store

    if store is None or isinstance(store, str):
        return Store(store)
    return store


def figure_bundle(figure: Any) -> dict[str, Any]:
    """The display_data output of a plotly figure (JupyterLab's plotly mimetype renderer draws it)."""
    spec = json.loads(figure.to_json())
    title = (spec.get("layout", {}).get("title") or {}).get("text", "figure")
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.plotly.v1+json": {"data": spec.get("data", []),
                                                         "layout": spec.get("layout", {}), "config": {}},
                     "text/plain": f"<plotly figure: {title}>"}}


def html_bundle(text_html: str, plain: str = "") -> dict[str, Any]:
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": text_html, "text/plain": plain}}


def show(output: W.Output, *items: dict[str, Any], clear: bool = False) -> None:
    """Append display bundles to ``output`` (or replace what it shows, with ``clear``)."""
    output.outputs = (() if clear else tuple(output.outputs)) + tuple(items)


def error_text(where: str, exc: BaseException) -> str:
    """The one line an error is shown as: ``error in Run: ModelLoadError: unknown zoo model 'nope'; ...``."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error in {where}: {type(exc).__name__}: {detail}" if detail else f"error in {where}: {type(exc).__name__}"


def error_html(line: str, exc: BaseException) -> str:
    """The line in red, its traceback's tail folded under it (closed)."""
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:])
    return (f"<div class='workbench-error' style='color:#b00020'><b>{html.escape(line)}</b>"
            f"<details><summary>traceback</summary><pre>{html.escape(tail)}</pre></details></div>")


def error_line() -> W.HTML:
    """The panel's error line, placed right beside the button that failed; empty until an error."""
    line = W.HTML(value="", layout=W.Layout(max_width="900px"))
    line.add_class("workbench-error-line")
    return line


def status_line(text: str) -> W.HTML:
    """The panel's status line (what it is doing now), right under its buttons."""
    line = W.HTML(value=text, layout=W.Layout(max_width="900px"))
    line.add_class("workbench-status")
    return line


def show_error(target: W.HTML | W.Output, where: str, exc: BaseException) -> str:
    """Show one red error line in ``target`` and return the line: an error line (:func:`error_line`,
    replaced: only the latest error shows) or an Output (appended)."""
    line = error_text(where, exc)
    if isinstance(target, W.Output):
        show(target, html_bundle(error_html(line, exc), line))
    else:
        target.value = error_html(line, exc)
    return line


def shows_errors(where: str) -> Callable:
    """Decorator for panel callbacks: an exception becomes the panel's error line (``self.error``, beside
    its buttons) and an entry of ``self.errors``, instead of vanishing into the kernel log."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def safe(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # a callback's exception would otherwise vanish into the kernel log
                self.errors.append(show_error(self.error, where, exc))
                failed = getattr(self, "_after_error", None)
                if failed is not None:
                    failed(where)
                return None

        return safe

    return wrap


def table_html(frame: Any, css_class: str, max_width_px: int = 900, nowrap: tuple[str, ...] = ()) -> str:
    """A DataFrame as an escaped HTML table with a class the tests and the browser can find, no wider
    than ``max_width_px``: its cells wrap instead of widening it, except the ``nowrap`` columns (short
    ones: a time, an id, a speedup with its interval)."""
    table = frame.to_html(index=False, escape=True, na_rep="-", classes=[css_class], border=0)
    keep = "".join(f"table.{css_class} td:nth-child({list(frame.columns).index(c) + 1}) {{white-space: nowrap}}"
                   for c in nowrap if c in frame.columns)
    return (f"<style>table.{css_class} td, table.{css_class} th {{white-space: normal; padding: 2px 8px; "
            f"text-align: left; vertical-align: top}} {keep}</style>"
            f"<div style='max-width:{max_width_px}px; overflow-x:auto'>{table}</div>")
