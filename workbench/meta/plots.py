"""Meta-learner data -> plotly figures, nothing else (the data comes from ``meta.explain``).

Example:
    >>> import pandas as pd
    >>> fig = importance_figure(pd.DataFrame({"feature": ["threads"], "importance_mean": [0.1],
    ...                                       "importance_std": [0.01]}))
    >>> fig.layout.title.text
    'Permutation importance (rise in log-speedup MAE when shuffled)'
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def importance_figure(importance: pd.DataFrame, top: int = 15) -> go.Figure:
    """Horizontal bars of ``importance_mean`` with ``importance_std`` error bars."""
    shown = importance.head(top).iloc[::-1]
    fig = go.Figure(go.Bar(x=shown["importance_mean"], y=shown["feature"], orientation="h",
                           error_x={"type": "data", "array": shown["importance_std"]}))
    fig.update_layout(title="Permutation importance (rise in log-speedup MAE when shuffled)",
                      xaxis_title="importance", height=120 + 24 * len(shown))
    return fig


def partial_dependence_figure(dependence: pd.DataFrame) -> go.Figure:
    """One panel per feature: average predicted speedup against the feature's value."""
    names = list(dict.fromkeys(dependence["feature"]))
    fig = make_subplots(rows=max(len(names), 1), cols=1, subplot_titles=names)
    for i, name in enumerate(names, start=1):
        part = dependence[dependence["feature"] == name]
        fig.add_trace(go.Scatter(x=part["value"], y=part["predicted_speedup"], mode="lines+markers", name=name),
                      row=i, col=1)
        fig.update_yaxes(title_text="speedup (x)", row=i, col=1)
    fig.update_layout(title="Partial dependence of the predicted speedup", showlegend=False,
                      height=200 + 220 * max(len(names), 1))
    return fig


def contributions_figure(contributions: pd.DataFrame, title: str = "Why this recommendation") -> go.Figure:
    """Bars of each feature's contribution to the predicted log speedup (positive: faster)."""
    shown = contributions.iloc[::-1]
    fig = go.Figure(go.Bar(x=shown["contribution_log_speedup"], y=shown["feature"], orientation="h"))
    fig.update_layout(title=title, xaxis_title="contribution to log speedup", height=120 + 24 * len(shown))
    return fig
