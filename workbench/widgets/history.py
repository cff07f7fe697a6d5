"""The history panel: filter stored runs, compare chosen runs side by side, see the trade-off frontier.

Example:
    >>> from workbench.widgets import history
    >>> panel = history(store="sqlite:////tmp/example.sqlite")  # doctest: +SKIP
    >>> panel.technique.value = "speculative"; panel.runs.value = tuple(panel.runs.options[:2])  # doctest: +SKIP
    >>> panel.compare_button.click(); panel.selected_table  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from workbench.meta.features import configuration_id
from workbench.names import configuration_name, machine_name
from workbench.widgets._common import error_line, figure_bundle, open_store, show, shows_errors, table_html

_ALL = "(all)"
_STYLE = {"description_width": "110px"}
PAGE_SIZE = 15  # runs per page of the history table
HISTORY_COLUMNS = ["run_id", "created_at", "status", "model", "workload", "technique", "draft", "params",
                   "configuration", "machine_id", "machine", "speedup", "speedup_ci_low", "speedup_ci_high",
                   "verdict", "modality", "quality_loss", "loss_unit", "noisy_machine", "failure_reason"]
#: What :func:`history_table` reads of each stored run (never the raw samples or outputs).
STORE_COLUMNS = ["run_id", "created_at", "status", "failure_reason", "model", "workload", "technique", "draft",
                 "params", "device", "machine_id", "environment", "summary", "internals", "quality", "lossless",
                 "speedup", "speedup_ci_low", "speedup_ci_high", "noisy"]
#: The history page's columns, key ones first.
PAGE_COLUMNS = ["when (UTC)", "model", "configuration", "speedup (95% CI)", "quality", "machine", "run", "status"]
#: What the table can be sorted by: label -> column of :func:`history_table`.
SORT_COLUMNS = {"time": "created_at", "speedup": "speedup", "quality loss": "quality_loss", "model": "model",
                "configuration": "configuration", "machine": "machine"}


def history_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One display row per stored run: identity, speedup with its interval and verdict, the quality loss in
    its modality's unit (``loss_unit``), and whether the machine was noisy while it ran."""
    from workbench.measure import verdict_of
    from workbench.quality import LOSS_SCALES, quality_loss

    rows = []
    for run in runs.to_dict(orient="records"):
        modality = ((run.get("internals") or {}).get("workload_info") or {}).get("modality") or "unknown"
        lossless = run.get("lossless") is True
        loss = quality_loss(run.get("quality"), modality, lossless) if run.get("status") == "ok" else None
        scale = LOSS_SCALES.get(modality)
        comparison = (run.get("summary") or {}).get("comparison") or {}
        rows.append({
            "run_id": run["run_id"], "created_at": run["created_at"], "status": run["status"],
            "model": run["model"], "workload": run["workload"], "technique": run["technique"],
            "draft": run.get("draft"), "params": ", ".join(f"{k}={v}" for k, v in (run.get("params") or {}).items()),
            "configuration": configuration_name(configuration_id(
                run["technique"], run.get("params") or {},
                run["draft"] if isinstance(run.get("draft"), str) and run["draft"] else None)),
            "machine_id": run.get("machine_id"),
            "machine": machine_name(run.get("environment"), run.get("machine_id"), run.get("device")),
            "speedup": run.get("speedup"),
            "speedup_ci_low": run.get("speedup_ci_low"), "speedup_ci_high": run.get("speedup_ci_high"),
            "verdict": verdict_of(comparison) if comparison else None,
            "modality": modality, "quality_loss": loss, "loss_unit": scale.label if scale else None,
            "noisy_machine": run.get("noisy") is True, "failure_reason": run.get("failure_reason"),
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def history_page(table: pd.DataFrame, sort_by: str = "created_at", descending: bool = True, page: int = 0,
                 page_size: int = PAGE_SIZE) -> pd.DataFrame:
    """One page of the sorted history as people read it: key columns first, human names, 3 significant
    figures, runs by their first 8 characters, times to the minute (UTC). Missing values sort last."""
    from workbench.names import sig, speedup_text
    from workbench.quality import loss_text

    ordered = table.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
    part = ordered.iloc[page * page_size:(page + 1) * page_size]
    rows = []
    for run in part.to_dict(orient="records"):
        ok = run["status"] == "ok"
        speed = speedup_text(run["speedup"], run["speedup_ci_low"], run["speedup_ci_high"]) if ok else "-"
        rows.append({
            "when (UTC)": pd.Timestamp(run["created_at"]).strftime("%Y-%m-%d %H:%M"),
            "model": run["model"], "configuration": run["configuration"],
            "speedup (95% CI)": f"{speed} {run['verdict'] or ''}".strip() if ok and sig(run["speedup"]) != "-" else "-",
            "quality": loss_text(run["quality_loss"], run["modality"]) if ok else "-",
            "machine": run["machine"] + (" (noisy)" if run["noisy_machine"] else ""),
            "run": str(run["run_id"])[:8],
            "status": run["status"] if ok else f"{run['status']}: {run['failure_reason'] or ''}"[:80],
        })
    return pd.DataFrame(rows, columns=PAGE_COLUMNS)


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """The runs no other run of the same modality beats on both speedup (higher) and quality loss (lower)."""
    kept = []
    for _, part in table.dropna(subset=["speedup", "quality_loss"]).groupby("modality", sort=True):
        points = part.sort_values(["quality_loss", "speedup"], ascending=[True, False])
        best = -float("inf")
        for index, row in points.iterrows():
            if row["speedup"] > best:
                best = row["speedup"]
                kept.append(index)
    return table.loc[kept]


def frontier_figure(table: pd.DataFrame) -> go.Figure:
    """Speedup against quality loss, one panel per modality (each loss in its own unit), one marker per run
    (colour: technique, symbol: machine, open marker: noisy machine), the frontier as a line."""
    from plotly.subplots import make_subplots

    from workbench.quality import LOSS_SCALES

    ok = table.dropna(subset=["speedup", "quality_loss"])
    modalities = sorted(ok["modality"].astype(str).unique()) or ["unknown"]
    fig = make_subplots(rows=1, cols=len(modalities), subplot_titles=modalities, shared_yaxes=True)
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star"]
    machines = {m: symbols[i % len(symbols)] for i, m in enumerate(ok["machine"].astype(str).unique())}
    front = pareto_front(ok)
    shown: set[str] = set()
    for column, modality in enumerate(modalities, start=1):
        for technique, part in ok[ok["modality"] == modality].groupby("technique"):
            low = part["speedup"] - part["speedup_ci_low"].fillna(part["speedup"])
            high = part["speedup_ci_high"].fillna(part["speedup"]) - part["speedup"]
            symbol = [machines[str(m)] + ("-open" if noisy else "") for m, noisy in
                      zip(part["machine"], part["noisy_machine"])]
            fig.add_trace(go.Scatter(
                x=part["quality_loss"], y=part["speedup"], mode="markers", name=str(technique),
                legendgroup=str(technique), showlegend=str(technique) not in shown,
                marker={"size": 10, "symbol": symbol}, error_y={"type": "data", "array": high, "arrayminus": low},
                text=[f"{m} | {w} | {c} | {machine}" + (" | noisy machine" if noisy else "") for m, w, c, machine, noisy
                      in zip(part["model"], part["workload"], part["configuration"], part["machine"],
                             part["noisy_machine"])]),
                row=1, col=column)
            shown.add(str(technique))
        line = front[front["modality"] == modality]
        if len(line):
            fig.add_trace(go.Scatter(x=line["quality_loss"], y=line["speedup"], mode="lines", name="frontier",
                                     legendgroup="frontier", showlegend="frontier" not in shown,
                                     line={"dash": "dot"}), row=1, col=column)
            shown.add("frontier")
        scale = LOSS_SCALES.get(modality)
        fig.update_xaxes(title_text=scale.label if scale else "quality loss", row=1, col=column)
    fig.add_hline(y=1.0, line_dash="dash")
    fig.update_yaxes(title_text="speedup (x, 95% CI)", row=1, col=1)
    fig.update_layout(title="Trade-off: speedup against quality loss, across runs and machines "
                            "(open markers: noisy machine)")
    return fig


class HistoryPanel:
    """Filters (``model``, ``technique``, ``machine``, ``since``, ``until``, ``ok_only``), the filtered
    ``table`` (DataFrame, one row per run, every column), shown a page at a time (``page_rows``: the page
    as people read it, ``sort_by`` + ``order``, ``prev_button`` / ``next_button``, ``page_label``), a run
    picker ``runs`` with ``compare_button`` (-> ``selected_table``), the trade-off ``figure``, ``error``
    (the latest error line, under the buttons), an ``output`` area (the figure) and ``errors``."""

    def __init__(self, store: Any = None, page_size: int = PAGE_SIZE) -> None:
        self.store = open_store(store)
        self.page_size = page_size
        self.page = 0  # 0-based page of the sorted table
        self.errors: list[str] = []
        self.table = pd.DataFrame(columns=HISTORY_COLUMNS)
        self.page_rows = pd.DataFrame(columns=PAGE_COLUMNS)
        self.selected_table = pd.DataFrame()
        self.figure: go.Figure | None = None
        self._updating = False
        # 1. Filters, sorting and paging, the run picker.
        self.model = W.Dropdown(description="model", style=_STYLE)
        self.technique = W.Dropdown(description="technique", style=_STYLE)
        self.machine = W.Dropdown(description="machine", style=_STYLE)
        self.since = W.DatePicker(description="from", style=_STYLE)
        self.until = W.DatePicker(description="until", style=_STYLE)
        self.ok_only = W.Checkbox(value=True, description="successful runs only", indent=False)
        self.refresh_button = W.Button(description="Reload store", icon="refresh")
        self.sort_by = W.Dropdown(options=list(SORT_COLUMNS), value="time", description="sort by", style=_STYLE)
        self.order = W.Dropdown(options=["descending", "ascending"], value="descending", description="order",
                                style=_STYLE)
        self.prev_button = W.Button(description="previous", icon="arrow-left", layout=W.Layout(width="110px"))
        self.next_button = W.Button(description="next", icon="arrow-right", layout=W.Layout(width="110px"))
        self.page_label = W.HTML()
        self.runs = W.SelectMultiple(description="runs", rows=8, style=_STYLE, layout=W.Layout(width="95%"))
        self.compare_button = W.Button(description="Compare selected", button_style="primary")
        self.error = error_line()
        self.table_html = W.HTML(layout=W.Layout(max_width="900px"))
        self.compare_html = W.HTML(layout=W.Layout(max_width="900px"))
        self.output = W.Output()
        # 2. Wiring: a filter re-reads the store; sorting and paging only redraw the page.
        for control in (self.model, self.technique, self.machine, self.since, self.until, self.ok_only):
            control.observe(self._on_filter, names="value")
        for control in (self.sort_by, self.order):
            control.observe(self._on_sort, names="value")
        self.prev_button.on_click(self._on_prev)
        self.next_button.on_click(self._on_next)
        self.refresh_button.on_click(self._on_refresh)
        self.compare_button.on_click(self._on_compare)
        # 3. Layout.
        self.widget = W.VBox([
            W.HTML("<b>workbench: run history</b>"),
            W.HBox([self.model, self.technique, self.machine]), W.HBox([self.since, self.until, self.ok_only]),
            W.HBox([self.refresh_button, self.sort_by, self.order]),
            W.HBox([self.prev_button, self.next_button, self.page_label]), self.table_html,
            self.runs, self.compare_button, self.error, self.compare_html, self.output])
        self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- filters ----------------------------------------------------------------------------------
    @shows_errors("Reload store")
    def _on_refresh(self, _button: Any = None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-read the store's filter options (models, techniques by title, machines by name), then filter."""
        from workbench import techniques

        runs = self.store.runs(columns=["model", "technique", "machine_id", "environment", "device"])
        titles = {}
        for name in runs["technique"].dropna().astype(str).unique():
            try:
                titles[name] = techniques.get(name).title or name.replace("_", " ")
            except Exception:  # a plug-in not installed here
                titles[name] = name
        machines = {str(r["machine_id"]): machine_name(r["environment"], r["machine_id"], r["device"])
                    for r in runs.dropna(subset=["machine_id"]).to_dict(orient="records")}
        choices = {self.model: [(m, m) for m in sorted(runs["model"].dropna().astype(str).unique())],
                   self.technique: sorted(((t, n) for n, t in titles.items())),
                   self.machine: sorted(((label, m) for m, label in machines.items()))}
        self._updating = True
        try:
            for control, options in choices.items():
                control.options = [(_ALL, _ALL), *options]
                if control.value not in [value for _, value in control.options]:
                    control.value = _ALL
        finally:
            self._updating = False
        self.apply_filters()

    @shows_errors("filtering")
    def _on_filter(self, _change: Any = None) -> None:
        if not self._updating:
            self.apply_filters()

    def apply_filters(self) -> pd.DataFrame:
        """The filtered runs as ``table``; back to the first page; refreshes the page, the picker, the figure."""
        def one(control: W.Dropdown) -> str | None:
            return None if control.value in (None, _ALL) else control.value

        since = dt.datetime.combine(self.since.value, dt.time()) if self.since.value else None
        until = dt.datetime.combine(self.until.value, dt.time()) + dt.timedelta(days=1) if self.until.value else None
        runs = self.store.runs(model=one(self.model), technique=one(self.technique), machine_id=one(self.machine),
                               since=since, until=until, status="ok" if self.ok_only.value else None,
                               columns=STORE_COLUMNS)
        self.table = history_table(runs)
        self.page = 0
        self.show_page()
        self.figure = frontier_figure(self.table)
        show(self.output, figure_bundle(self.figure), clear=True)
        return self.table

    # -- sorting and paging -----------------------------------------------------------------------
    @property
    def pages(self) -> int:
        return max(1, -(-len(self.table) // self.page_size))

    @shows_errors("sorting")
    def _on_sort(self, _change: Any = None) -> None:
        self.page = 0
        self.show_page()

    @shows_errors("previous")
    def _on_prev(self, _button: Any = None) -> None:
        self.page = max(0, self.page - 1)
        self.show_page()

    @shows_errors("next")
    def _on_next(self, _button: Any = None) -> None:
        self.page = min(self.pages - 1, self.page + 1)
        self.show_page()

    def show_page(self) -> pd.DataFrame:
        """Draw page ``page`` of the table in the chosen order (and the picker in the same order)."""
        column, descending = SORT_COLUMNS[self.sort_by.value], self.order.value == "descending"
        self.page = min(max(self.page, 0), self.pages - 1)
        # 1. The page; a column that says the same on every run (all ok, one machine) is said once instead.
        self.page_rows = history_page(self.table, column, descending, self.page, self.page_size)
        if self.ok_only.value:
            self.page_rows = self.page_rows.drop(columns=["status"])
        machines = self.table["machine"].unique()
        if len(machines) == 1:
            self.page_rows = self.page_rows.drop(columns=["machine"])
        # 2. Where we are, and the buttons that move.
        first = self.page * self.page_size
        self.page_label.value = (f"page {self.page + 1} of {self.pages}: runs {min(first + 1, len(self.table))}-"
                                 f"{min(first + self.page_size, len(self.table))} of {len(self.table)}"
                                 + (f", all on {html.escape(str(machines[0]))}" if len(machines) == 1 else ""))
        self.prev_button.disabled, self.next_button.disabled = self.page == 0, self.page >= self.pages - 1
        self.table_html.value = table_html(self.page_rows, "workbench-history", nowrap=("when (UTC)", "run"))
        ordered = self.table.sort_values(column, ascending=not descending, na_position="last", kind="stable")
        self.runs.options = [(self._label(r), r["run_id"]) for r in ordered.to_dict(orient="records")]
        return self.page_rows

    @staticmethod
    def _label(row: dict[str, Any]) -> str:
        from workbench.names import speedup_text

        speed = "-" if pd.isna(row["speedup"]) else speedup_text(row["speedup"])
        return (f"{pd.Timestamp(row['created_at']).strftime('%Y-%m-%d %H:%M')}  {row['model']}  "
                f"{row['configuration']}  {speed}  {row['machine']}  {str(row['run_id'])[:8]}")

    # -- side by side -----------------------------------------------------------------------------
    @shows_errors("Compare selected")
    def _on_compare(self, _button: Any = None) -> None:
        self.compare_selected()

    def compare_selected(self) -> pd.DataFrame:
        """The chosen runs side by side (one column per run), as ``selected_table`` and HTML."""
        self.error.value = ""
        chosen = self.table[self.table["run_id"].isin(self.runs.value)]
        if chosen.empty:
            raise ValueError("no runs selected: pick one or more runs in the list, then press Compare selected")
        self.selected_table = chosen.set_index("run_id").T
        shown = self.selected_table.copy()
        shown.columns = [str(c)[:8] for c in shown.columns]
        self.compare_html.value = ("<p><b>selected runs side by side</b></p><div style='max-width:900px; "
                                   "overflow-x:auto'>" + shown.to_html(escape=True, na_rep="-",
                                                                         classes=["workbench-selected"], border=0)
                                   + "</div>")
        return self.selected_table


def history(store: Any = None, page_size: int = PAGE_SIZE) -> HistoryPanel:
    """The history panel (see :class:`HistoryPanel`), ``page_size`` runs per page.

    Example:
        >>> history("sqlite:////tmp/example.sqlite").table.shape  # doctest: +SKIP
        (12, 20)
    """
    return HistoryPanel(store=store, page_size=page_size)
