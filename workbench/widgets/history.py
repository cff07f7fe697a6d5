"""The history panel: filter stored runs, compare chosen runs side by side, see the trade-off frontier.

Example:
    >>> from workbench.widgets import history
    >>> panel = history(store="sqlite:////tmp/example.sqlite")  # doctest: +SKIP
    >>> panel.technique.value = "speculative"; panel.runs.value = tuple(panel.runs.options[:2])  # doctest: +SKIP
    >>> panel.compare_button.click(); panel.selected_table  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from workbench.widgets._common import figure_bundle, html_bundle, open_store, show, shows_errors, table_html

_ALL = "(all)"
_STYLE = {"description_width": "110px"}


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
            "machine_id": run.get("machine_id"), "speedup": run.get("speedup"),
            "speedup_ci_low": run.get("speedup_ci_low"), "speedup_ci_high": run.get("speedup_ci_high"),
            "verdict": verdict_of(comparison) if comparison else None,
            "modality": modality, "quality_loss": loss, "loss_unit": scale.label if scale else None,
            "noisy_machine": run.get("noisy") is True, "failure_reason": run.get("failure_reason"),
        })
    return pd.DataFrame(rows, columns=["run_id", "created_at", "status", "model", "workload", "technique", "draft",
                                       "params", "machine_id", "speedup", "speedup_ci_low", "speedup_ci_high",
                                       "verdict", "modality", "quality_loss", "loss_unit", "noisy_machine",
                                       "failure_reason"])


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
    machines = {m: symbols[i % len(symbols)] for i, m in enumerate(ok["machine_id"].astype(str).unique())}
    front = pareto_front(ok)
    shown: set[str] = set()
    for column, modality in enumerate(modalities, start=1):
        for technique, part in ok[ok["modality"] == modality].groupby("technique"):
            low = part["speedup"] - part["speedup_ci_low"].fillna(part["speedup"])
            high = part["speedup_ci_high"].fillna(part["speedup"]) - part["speedup"]
            symbol = [machines[str(m)] + ("-open" if noisy else "") for m, noisy in
                      zip(part["machine_id"], part["noisy_machine"])]
            fig.add_trace(go.Scatter(
                x=part["quality_loss"], y=part["speedup"], mode="markers", name=str(technique),
                legendgroup=str(technique), showlegend=str(technique) not in shown,
                marker={"size": 10, "symbol": symbol}, error_y={"type": "data", "array": high, "arrayminus": low},
                text=[f"{m} | {w} | {p} | machine {mid}" + (" | noisy machine" if noisy else "") for m, w, p, mid, noisy
                      in zip(part["model"], part["workload"], part["params"], part["machine_id"], part["noisy_machine"])]),
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
    ``table`` (DataFrame) and its HTML, a run picker ``runs`` with ``compare_button`` (-> ``selected_table``),
    the trade-off ``figure``, an ``output`` area (figure and error lines) and ``errors``."""

    def __init__(self, store: Any = None) -> None:
        self.store = open_store(store)
        self.errors: list[str] = []
        self.table = pd.DataFrame()
        self.selected_table = pd.DataFrame()
        self.figure: go.Figure | None = None
        self.model = W.Dropdown(description="model", style=_STYLE)
        self.technique = W.Dropdown(description="technique", style=_STYLE)
        self.machine = W.Dropdown(description="machine", style=_STYLE)
        self.since = W.DatePicker(description="from", style=_STYLE)
        self.until = W.DatePicker(description="until", style=_STYLE)
        self.ok_only = W.Checkbox(value=True, description="successful runs only", indent=False)
        self.refresh_button = W.Button(description="Reload store", icon="refresh")
        self.runs = W.SelectMultiple(description="runs", rows=8, style=_STYLE, layout=W.Layout(width="95%"))
        self.compare_button = W.Button(description="Compare selected", button_style="primary")
        self.table_html = W.HTML()
        self.compare_html = W.HTML()
        self.output = W.Output()
        for control in (self.model, self.technique, self.machine, self.since, self.until, self.ok_only):
            control.observe(self._on_filter, names="value")
        self.refresh_button.on_click(self._on_refresh)
        self.compare_button.on_click(self._on_compare)
        self.widget = W.VBox([
            W.HTML("<b>workbench: run history</b>"),
            W.HBox([self.model, self.technique, self.machine]), W.HBox([self.since, self.until, self.ok_only]),
            self.refresh_button, self.table_html, self.runs, self.compare_button, self.compare_html, self.output])
        self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    @shows_errors("Reload store")
    def _on_refresh(self, _button: Any = None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-read the store's filter options, then apply the filters."""
        runs = self.store.runs(columns=["model", "technique", "machine_id"])
        self._updating = True
        try:
            for control, column in ((self.model, "model"), (self.technique, "technique"),
                                    (self.machine, "machine_id")):
                options = [_ALL, *sorted(runs[column].dropna().astype(str).unique())]
                control.options = options
                if control.value not in options:
                    control.value = _ALL
        finally:
            self._updating = False
        self.apply_filters()

    @shows_errors("filtering")
    def _on_filter(self, _change: Any = None) -> None:
        if not getattr(self, "_updating", False):
            self.apply_filters()

    def apply_filters(self) -> pd.DataFrame:
        """The filtered runs as ``table``; refreshes the table, the run picker and the frontier figure."""
        def one(control: W.Dropdown) -> str | None:
            return None if control.value in (None, _ALL) else control.value

        since = dt.datetime.combine(self.since.value, dt.time()) if self.since.value else None
        until = dt.datetime.combine(self.until.value, dt.time()) + dt.timedelta(days=1) if self.until.value else None
        runs = self.store.runs(model=one(self.model), technique=one(self.technique), machine_id=one(self.machine),
                               since=since, until=until, status="ok" if self.ok_only.value else None)
        self.table = history_table(runs)
        shown = self.table.drop(columns=["failure_reason"] if self.ok_only.value else []).round(
            {c: 3 for c in ("speedup", "speedup_ci_low", "speedup_ci_high", "quality_loss")})
        self.table_html.value = f"<p>{len(self.table)} run(s)</p>" + table_html(shown.tail(50), "workbench-history")
        self.runs.options = [(self._label(r), r["run_id"]) for r in self.table.to_dict(orient="records")]
        self.figure = frontier_figure(self.table)
        show(self.output, figure_bundle(self.figure), clear=True)
        return self.table

    @staticmethod
    def _label(row: dict[str, Any]) -> str:
        speed = "-" if pd.isna(row["speedup"]) else f"{row['speedup']:.2f}x"
        return (f"{str(row['created_at'])[:19]}  {row['model']}  {row['technique']}  {row['params']}  "
                f"{speed}  {row['machine_id']}")

    @shows_errors("Compare selected")
    def _on_compare(self, _button: Any = None) -> None:
        self.compare_selected()

    def compare_selected(self) -> pd.DataFrame:
        """The chosen runs side by side (one column per run), as ``selected_table`` and HTML."""
        chosen = self.table[self.table["run_id"].isin(self.runs.value)]
        if chosen.empty:
            raise ValueError("no runs selected: pick one or more runs in the list, then press Compare selected")
        self.selected_table = chosen.set_index("run_id").T
        self.compare_html.value = ("<p><b>selected runs side by side</b></p>"
                                   + self.selected_table.to_html(escape=True, na_rep="-",
                                                                 classes=["workbench-selected"], border=0))
        return self.selected_table


def history(store: Any = None) -> HistoryPanel:
    """The history panel (see :class:`HistoryPanel`).

    Example:
        >>> history("sqlite:////tmp/example.sqlite").table.shape  # doctest: +SKIP
        (12, 14)
    """
    return HistoryPanel(store=store)
