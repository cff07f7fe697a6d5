"""Shared plumbing of the panels: opening the store, showing figures and errors in an Output widget.

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


def show_error(output: W.Output, where: str, exc: BaseException) -> str:
    """One red error line in ``output`` (the traceback's tail kept in a collapsed block); returns the line."""
    line = f"error in {where}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:])
    show(output, html_bundle(f"<div class='workbench-error' style='color:#b00020'><b>{html.escape(line)}</b>"
                             f"<details><summary>traceback</summary><pre>{html.escape(tail)}</pre></details></div>",
                             line))
    return line


def shows_errors(where: str) -> Callable:
    """Decorator for panel callbacks: an exception becomes an error line in ``self.output`` and ``self.errors``."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def safe(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # a callback's exception would otherwise vanish into the kernel log
                self.errors.append(show_error(self.output, where, exc))
                return None

        return safe

    return wrap


def table_html(frame: Any, css_class: str) -> str:
    """A DataFrame as an escaped HTML table with a class the tests and the browser can find."""
    return frame.to_html(index=False, escape=True, na_rep="-", classes=[css_class], border=0)
