"""Scheduled reports: stored runs -> report data -> HTML sections -> one self-contained HTML file.

Three layers, each usable alone:

1. :class:`ReportParams` and :func:`check_store` validate what a scheduled job asked for, fast.
2. :func:`build_report` reads the store and returns the report as data (DataFrames, dicts, sentences):
   per-configuration results with confidence intervals, the comparison with the previous window, failed
   runs, the one-screen decision, the meta-learner (when the window can evaluate it), each machine's environment.
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

from workbench.report.params import (AUDIENCES, KERNEL_NAME, PARAM_KEYS, REPORT_NOTEBOOK, ReportParams, check_filters,
                                     check_store)
from workbench.report.data import (best_choices, build_report, changes_since, decision, environments,
                                   learner_evaluation, machine_label, results_table, run_counts, summary_sentences)
from workbench.report.sections import (FigureEmbedder, decision_html, environment_html, esc, evidence_html,
                                       explanation_figures, failed_html, glossary_html, header_html,
                                       learner_html, recommendations_html, section, summary_html, table_html,
                                       tradeoff_figure)
from workbench.report.render import render_report, to_html


__all__ = ["AUDIENCES", "FigureEmbedder", "KERNEL_NAME", "PARAM_KEYS", "REPORT_NOTEBOOK", "ReportParams",
           "best_choices", "build_report", "changes_since", "check_filters", "check_store", "decision",
           "decision_html", "environment_html", "environments", "esc", "evidence_html", "explanation_figures",
           "failed_html", "glossary_html", "header_html", "learner_evaluation", "learner_html",
           "machine_label", "recommendations_html", "render_report", "results_table", "run_counts", "section",
           "summary_html", "summary_sentences", "table_html", "to_html", "tradeoff_figure"]
