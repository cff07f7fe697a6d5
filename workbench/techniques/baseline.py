"""The baseline: the model as it is, run the ordinary way. Every comparison is against it.

Greedy by default; when the technique it is compared with samples (``Trial.sampling``), the baseline
samples with the same settings (the runner seeds both alike before every call).

Example:
    >>> from workbench.techniques.baseline import Baseline
    >>> Baseline().lossless
    True
"""

from __future__ import annotations

from typing import Any

from workbench.measure import CallOutput
from workbench.techniques._execute import run_plain
from workbench.techniques.base import Outcome, Technique, TechniqueReport, Trial, register


@register
class Baseline(Technique):
    """Runs the unmodified model: greedy (or the trial's sampled) ``generate``, a plain forward pass, or
    the pipeline as is."""

    name = "baseline"
    applies_to = ("causal_lm", "classifier", "diffusion")
    description = "the model as it is; the reference every technique is measured against"
    examples = (
        {"model": "zoo:code-draft", "workload": "code-prompts"},
        {"model": "zoo:code-classifier", "workload": "code-snippets"},
        {"model": "zoo:digits-diffusion", "workload": "digits", "steps": 4},
    )

    @property
    def lossless(self) -> bool:
        return True

    def prepare(self, trial: Trial) -> None:
        self._model, self._spec, self._sampling = trial.model, trial.spec, trial.sampling

    def run(self, batch: Any) -> CallOutput:
        return run_plain(self._model, batch, self._spec, self._sampling)

    def report(self, outcome: Outcome) -> TechniqueReport:
        return TechniqueReport(lossless=True, headline="the model as it is (an A/A check of the harness)")
