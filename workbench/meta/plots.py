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


#: Units of the numeric features, for axis titles (a feature not listed shows its stored value).
_UNITS = {"threads": "threads", "batch_size": "inputs per call", "model_layers": "layers", "model_hidden_size": "units",
          "model_vocab_size": "tokens", "output_tokens": "tokens", "diffusion_steps": "steps", "draft_tokens": "tokens",
          "prompt_lookup_tokens": "tokens", "weight_bits": "bits", "exit_threshold": "probability",
          "cpu_cores_logical": "cores", "prompt_chars_mean": "characters", "ram_gib": "GiB",
          "memory_bandwidth_gb_per_s": "GB/s", "draft_cost_ratio": "draft / target cost",
          "prompt_repeated_3gram_fraction": "fraction, 0-1", "draft_parameters": "parameters"}


def feature_axis_title(name: str) -> str:
    """``model_parameters_log10`` -> ``model parameters (log10)``, ``threads`` -> ``threads (threads)``."""
    if name.endswith("_log10"):
        return f"{name[:-6].replace('_', ' ')} (log10)"
    return f"{name.replace('_', ' ')} ({_UNITS.get(name, 'as stored')})"


def importance_figure(importance: pd.DataFrame, top: int = 15) -> go.Figure:
    """Horizontal bars of ``importance_mean`` with ``importance_std`` error bars."""
    shown = importance.head(top).iloc[::-1]
    fig = go.Figure(go.Bar(x=shown["importance_mean"], y=shown["feature"], orientation="h",
                           error_x={"type": "data", "array": shown["importance_std"]}))
    fig.update_layout(title="Permutation importance (rise in log-speedup MAE when shuffled)",
                      xaxis_title="rise in mean absolute error of log speedup (natural-log units)",
                      yaxis_title="feature", height=140 + 24 * len(shown))
    return fig


def partial_dependence_figure(dependence: pd.DataFrame) -> go.Figure:
    """One panel per feature: average predicted speedup against the feature's value."""
    names = list(dict.fromkeys(dependence["feature"]))
    fig = make_subplots(rows=max(len(names), 1), cols=1, subplot_titles=names)
    for i, name in enumerate(names, start=1):
        part = dependence[dependence["feature"] == name]
        fig.add_trace(go.Scatter(x=part["value"], y=part["predicted_speedup"], mode="lines+markers", name=name),
                      row=i, col=1)
        fig.update_yaxes(title_text="predicted speedup (x)", row=i, col=1)
        fig.update_xaxes(title_text=feature_axis_title(name), row=i, col=1)
    fig.update_layout(title="Partial dependence of the predicted speedup", showlegend=False,
                      height=200 + 220 * max(len(names), 1))
    return fig


def contributions_figure(contributions: pd.DataFrame, title: str = "Why this recommendation") -> go.Figure:
    """Bars of each feature's contribution to the predicted log speedup (positive: faster)."""
    shown = contributions.iloc[::-1]
    fig = go.Figure(go.Bar(x=shown["contribution_log_speedup"], y=shown["feature"], orientation="h"))
    fig.update_layout(title=title, xaxis_title="contribution to log speedup (natural-log units; + is faster)",
                      yaxis_title="feature", height=120 + 24 * len(shown))
    return fig
