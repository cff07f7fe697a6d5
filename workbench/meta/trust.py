"""How far a context is from what the meta-learner was trained on, and what that does to its intervals.

A learner trained on 1 and 2 threads, batches of 1 to 16 and models of 0.1M to 135M parameters knows
nothing measured about 8 threads, a batch of 39 or a 7B model; a tree extrapolates flat and a booster
repeats its edge leaves, both with unearned confidence. :class:`TrainingRange` records, per modality,
the observed range of every numeric context feature and the observed values of the categorical ones
(device, number format, GPU, model family); :meth:`TrainingRange.flags` names each way a
context falls outside it, in words. A flagged context's interval is widened (:func:`widen`: its log
half-widths times ``WIDEN_FACTOR`` per flag, at most ``MAX_WIDEN``), so the decision's fallback to the
baseline (no allowed candidate's lower bound clears the +-2% band) takes over unless the predicted gain
is large; the recommendation says so.

The same widening is applied in the leave-one-group-out evaluation, so the interval coverage printed by
``workbench learn`` is that of the intervals a user is shown.

Example:
    >>> table = pd.DataFrame({"modality": ["text-generation"] * 2, "batch_size": [1.0, 4.0],
    ...                       "threads": [1.0, 2.0], "device": ["cpu", "cpu"]})
    >>> TrainingRange.of(table).flags({"modality": "text-generation", "batch_size": 39.0, "threads": 2.0,
    ...                                "device": "cpu"})
    ['batch size 39 is outside the measured 1-4']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: Context features whose range is checked, with the words a flag uses.
NUMERIC_CHECKS: dict[str, str] = {
    "batch_size": "batch size",
    "output_tokens": "output length (tokens)",
    "diffusion_steps": "diffusion steps",
    "prompt_chars_mean": "mean prompt length (characters)",
    "model_parameters_log10": "model size",
    "model_layers": "model depth (layers)",
    "threads": "torch threads",
    "cpu_cores_logical": "CPU cores",
    "memory_bandwidth_gb_per_s": "memory bandwidth (GB/s)",
}
CATEGORICAL_CHECKS: dict[str, str] = {
    "device": "device",
    "dtype": "number format",
    "gpu_name": "GPU",
    "model_family": "model family",
}
WIDEN_FACTOR = 1.5  # each flag multiplies the interval's log half-widths by this
MAX_WIDEN = 4.0  # however many flags
RELATIVE_SLACK = 0.05  # a value within 5% of the observed range's ends counts as inside


@dataclass
class TrainingRange:
    """Observed ranges per modality: ``numeric[modality][feature] = (low, high)``,
    ``categorical[modality][feature] = set of values``."""

    numeric: dict[str, dict[str, tuple[float, float]]]
    categorical: dict[str, dict[str, set[str]]]

    @classmethod
    def of(cls, table: pd.DataFrame) -> TrainingRange:
        """The ranges of a training table (``features.training_table`` or a learner's ``training_table_``)."""
        numeric: dict[str, dict[str, tuple[float, float]]] = {}
        categorical: dict[str, dict[str, set[str]]] = {}
        if table.empty or "modality" not in table.columns:
            return cls(numeric, categorical)
        for modality, rows in table.groupby(table["modality"].astype(str)):
            numeric[modality] = {}
            for name in NUMERIC_CHECKS:
                if name in rows.columns:
                    values = pd.to_numeric(rows[name], errors="coerce").dropna()
                    if not values.empty:
                        numeric[modality][name] = (float(values.min()), float(values.max()))
            categorical[modality] = {name: set(rows[name].astype(str)) for name in CATEGORICAL_CHECKS
                                     if name in rows.columns}
        return cls(numeric, categorical)

    def flags(self, context: Mapping[str, Any]) -> list[str]:
        """Each way ``context`` falls outside the training range of its modality, in words."""
        modality = str(context.get("modality"))
        if modality not in self.numeric:
            return [f"no {modality} workload was measured"]
        out = []
        for name, (low, high) in self.numeric[modality].items():
            value = _number(context.get(name))
            if value is None:
                continue
            slack = RELATIVE_SLACK * max(abs(low), abs(high), 1e-12)
            if value < low - slack or value > high + slack:
                out.append(f"{NUMERIC_CHECKS[name]} {_show(name, value)} is outside the measured "
                           f"{_show(name, low)}-{_show(name, high)}")
        for name, seen in self.categorical.get(modality, {}).items():
            value = context.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if str(value) not in seen:
                shown = ", ".join(sorted(seen)[:3]) + (" ..." if len(seen) > 3 else "")
                out.append(f"{CATEGORICAL_CHECKS[name]} {value} was never measured (measured: {shown})")
        return out


def widen(point: np.ndarray, low: np.ndarray, high: np.ndarray, flags: Any) -> tuple[np.ndarray, np.ndarray]:
    """Log-space bounds widened around ``point`` by ``WIDEN_FACTOR ** flags`` (at most ``MAX_WIDEN``);
    ``flags``: a count, or one count per row.

    Example:
        >>> [round(float(v[0]), 3) for v in widen(np.array([0.0]), np.array([-0.1]), np.array([0.2]), 1)]
        [-0.15, 0.3]
    """
    factor = np.minimum(WIDEN_FACTOR ** np.maximum(np.asarray(flags, dtype=float), 0.0), MAX_WIDEN)
    return point - factor * (point - low), point + factor * (high - point)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _show(name: str, value: float) -> str:
    if name == "model_parameters_log10":
        return f"{10 ** value / 1e6:.3g}M parameters"
    return f"{value:.3g}"
