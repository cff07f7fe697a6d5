"""Techniques as plug-ins: one file each, one contract, registered by name.

Example:
    >>> from workbench import techniques
    >>> "baseline" in techniques.names()
    True
"""

from workbench.techniques import (adaptive_steps, baseline, early_exit, ode_steps, pruning,  # noqa: F401  (registers them)
                                  quantization, speculative, structured_sparsity)
from workbench.techniques.base import (ExpertRule, Facts, Metric, Outcome, Param, Technique, TechniqueReport, Trial,
                                       get, names, register, registered)

__all__ = ["ExpertRule", "Facts", "Metric", "Outcome", "Param", "Technique", "TechniqueReport", "Trial", "get",
           "names", "register", "registered"]
