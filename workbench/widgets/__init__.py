"""ipywidgets panels for JupyterLab: compare techniques, browse history, ask the meta-learner.

Each panel is a small object that holds its controls as attributes (so tests and notebooks can drive
it) and displays itself. The panels only wire controls to plain functions; runs execute in a worker
process (:class:`workbench.worker.IsolatedRun`), never in the kernel.

Example:
    >>> from workbench import widgets
    >>> panel = widgets.compare(store="sqlite:////tmp/example.sqlite")  # doctest: +SKIP
    >>> panel.model.value = "zoo:code-target"; panel.run_button.click()  # doctest: +SKIP
"""

from workbench.widgets.advisor import AdvisorPanel, advisor
from workbench.widgets.compare import ComparePanel, compare
from workbench.widgets.history import HistoryPanel, history

__all__ = ["AdvisorPanel", "ComparePanel", "HistoryPanel", "advisor", "compare", "history"]
