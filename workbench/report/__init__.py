"""Scheduled reports: stored runs -> report data -> HTML sections -> one self-contained HTML file.

Three layers, each usable alone:

1. :class:`ReportParams` and :func:`check_store` validate what a scheduled job asked for, fast.
2. :func:`build_report` reads the store and returns the report as data (DataFrames, dicts, sentences):
   per-configuration results with confidence intervals, the comparison with the previous window, failed
   runs, the meta-learner's recommendations and explanation, each machine's environment.
3. ``*_html`` / ``*_figure`` functions render that data (every string from the store escaped), and
   :func:`render_report` executes ``notebooks/report.ipynb`` with papermill on a fresh kernel, converts it
   with nbconvert (no code, no prompts, plotly.js inlined once) and swaps the HTML into place atomically.

Example:
    >>> params = ReportParams(store_url="sqlite:///:memory:", since="7d")
    >>> data = build_report(params)
    >>> data["summary"][0]
    'No runs in this window (the last 7d): nothing to report. Run `workbench run ...` or widen --since.'

The package's modules are those layers: ``params``, ``data``, ``sections`` and ``render``
(``python -m workbench.report JOB`` is the child process ``render_report`` starts).
"""

from __future__ import annotations

from workbench.report.params import AUDIENCES, KERNEL_NAME, PARAM_KEYS, REPORT_NOTEBOOK, ReportParams, check_store
from workbench.report.data import (best_choices, build_report, changes_since, environments, machine_label,
                                   recommendations, results_table, run_counts, summary_sentences)
from workbench.report.sections import (FigureEmbedder, environment_html, esc, evidence_html, explanation_figures,
                                       explanation_html, header_html, recommendations_html, summary_html, table_html,
                                       tradeoff_figure)
from workbench.report.render import render_report, to_html


__all__ = ["AUDIENCES", "FigureEmbedder", "KERNEL_NAME", "PARAM_KEYS", "REPORT_NOTEBOOK", "ReportParams",
           "best_choices", "build_report", "changes_since", "check_store", "environment_html", "environments", "esc",
           "evidence_html", "explanation_figures", "explanation_html", "header_html", "machine_label",
           "recommendations", "recommendations_html", "render_report", "results_table", "run_counts", "summary_html",
           "summary_sentences", "table_html", "to_html", "tradeoff_figure"]
