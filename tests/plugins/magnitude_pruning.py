"""A technique from outside the package, in one file: unstructured magnitude pruning.

Zeroes the smallest-magnitude fraction of every linear layer's weights in a copy of the model and runs
the copy. Dense kernels do the same work on zeros, so it saves no time: the honest finding this file
exists to show is "fewer non-zero bytes, no speedup", with the quality it costs beside it.

Nothing else in the project names it: register it with ``WORKBENCH_TECHNIQUES=tests/plugins/magnitude_pruning.py``
and it runs through ``workbench run``, sweeps, the store, ``workbench learn``, the report and the compare panel.

Example:
    >>> MagnitudePruning(sparsity=0.5).config["sparsity"]
    0.5
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from workbench.measure import CallOutput
from workbench.techniques._execute import classify, generate
from workbench.techniques.base import (ExpertRule, Facts, Metric, Outcome, Param, Technique, TechniqueReport, Trial,
                                       register)


@register
class MagnitudePruning(Technique):
    """A copy of the model with the smallest weights of every linear layer set to zero."""

    name = "magnitude_pruning"
    applies_to = ("causal_lm", "classifier")
    description = "unstructured magnitude pruning: zero the smallest weights (saves non-zero bytes, not time)"
    examples = ({"model": "zoo:code-classifier", "workload": "code-snippets", "params": {"sparsity": 0.3}},)
    params = {
        "sparsity": Param(float, 0.5, "fraction of each linear layer's weights set to zero; more, fewer non-zero "
                          "bytes and more quality lost", minimum=0.0),
    }

    def check(self, facts: Facts, spec: Any) -> str | None:
        reason = super().check(facts, spec)
        if reason is None and not self.config["sparsity"] < 1.0:
            reason = f"magnitude_pruning sparsity={self.config['sparsity']} must be below 1: use e.g. sparsity=0.5"
        return reason

    def prepare(self, trial: Trial) -> None:
        # 1. A pruned copy: the shared model is only read.
        self._model, self._spec = trial.model, trial.spec
        self._pruned = copy.deepcopy(trial.model.model).eval()
        zeroed = total = 0
        with torch.no_grad():
            for module in self._pruned.modules():
                if isinstance(module, nn.Linear):
                    weight = module.weight
                    cut = torch.quantile(weight.abs().flatten().float(), self.config["sparsity"])
                    weight[weight.abs() <= cut] = 0.0
                    zeroed += int((weight == 0).sum())
                    total += weight.numel()
        self._zeroed, self._total = zeroed, total

    def run(self, batch: Any) -> CallOutput:
        if self._model.kind == "causal_lm":
            return generate(self._pruned, self._model.tokenizer, batch, self._spec.workload.max_new_tokens)
        return classify(self._pruned, batch)

    def report(self, outcome: Outcome) -> TechniqueReport:
        zeroed_percent = 100.0 * self._zeroed / self._total if self._total else 0.0
        return TechniqueReport(
            lossless=False,
            quality=[Metric("weights_zeroed_percent", zeroed_percent, "%", None, "linear weights zeroed")],
            internals={"zeroed_weights": self._zeroed, "linear_weights": self._total},
            features=self.features(self.config, self._model.info, None),
            headline=f"{zeroed_percent:.1f}% of linear weights zeroed (dense kernels still multiply them)")

    def release(self) -> None:
        self._pruned = None

    @classmethod
    def features(cls, params: dict[str, Any], model: dict[str, Any], draft: dict[str, Any] | None) -> dict[str, Any]:
        return {"step_policy": f"sparsity={params.get('sparsity', cls.params['sparsity'].default)}"}

    @classmethod
    def expert_rules(cls) -> list[ExpertRule]:
        return [ExpertRule(90, "never prune for speed on dense kernels", lambda rows: rows["technique"] != cls.name)]
