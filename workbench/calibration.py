"""A/A calibration: the baseline timed against itself, many times, to see how often the harness says
"no practical difference" when there is none.

With the equivalence band of :func:`workbench.measure.verdict` (+-2% by default) an honest harness on a
quiet machine should say "no practical difference" in at least 95% of A/A runs; a lower rate means the
band is too narrow for this machine, the machine is noisy, or the interleaving leaks an order effect.

Example:
    >>> from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
    >>> spec = RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=16),
    ...                TechniqueSpec("baseline"), repeats=3)
    >>> result = calibrate(spec, times=3)  # doctest: +SKIP
    >>> result.rate  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.measure import NO_DIFFERENCE, verdict_of
from workbench.specs import RunSpec, TechniqueSpec

REQUIRED_RATE = 0.95  # share of A/A runs that must come out "no practical difference"


@dataclass
class Calibration:
    """The outcome of ``times`` A/A runs: each run's speedup, interval and verdict, and the rate."""

    spec: RunSpec  # the A/A spec (technique: baseline)
    runs: list[dict[str, Any]] = field(default_factory=list)  # run_id, speedup, ci_low, ci_high, verdict, noisy

    @property
    def rate(self) -> float:
        """Share of successful A/A runs whose verdict is "no practical difference"."""
        ok = [r for r in self.runs if r["status"] == "ok"]
        return sum(r["verdict"] == NO_DIFFERENCE for r in ok) / len(ok) if ok else float("nan")

    @property
    def noisy_runs(self) -> int:
        return sum(bool(r["noisy"]) for r in self.runs)

    @property
    def passed(self) -> bool:
        return self.rate >= REQUIRED_RATE

    def text(self) -> str:
        """The rate and each run, for the terminal."""
        ok = [r for r in self.runs if r["status"] == "ok"]
        same = sum(r["verdict"] == NO_DIFFERENCE for r in ok)
        margin = self.spec.margin_percent
        lines = [f"A/A calibration: baseline against itself on {self.spec.model.name} / {self.spec.workload.name}, "
                 f"{len(self.runs)} runs of {self.spec.repeats} repeats, band +-{margin:g}%",
                 f"no practical difference in {same}/{len(ok)} runs ({self.rate:.0%}; needs >= "
                 f"{REQUIRED_RATE:.0%}): {'PASS' if self.passed else 'FAIL'}"]
        if self.noisy_runs:
            lines.append(f"{self.noisy_runs} run(s) on a noisy machine: the rate is from a contended machine")
        for index, r in enumerate(self.runs, start=1):
            interval = (f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else "(no interval)")
            lines.append(f"  {index:>2}. {r['speedup']:.3f}x {interval} {r['verdict']}"
                         + (" (noisy machine)" if r["noisy"] else "") if r["status"] == "ok"
                         else f"  {index:>2}. {r['status']}: {r['failure_reason']}")
        return "\n".join(lines)


def calibrate(spec: RunSpec, times: int = 20, store: Any = None, wait_quiet_s: float = 0.0,
              on_run: Callable[[int, dict[str, Any]], None] | None = None) -> Calibration:
    """Run the baseline against itself ``times`` times (each a full measurement) and count the verdicts.

    Args:
        spec: the model, workload and settings; its technique is replaced by the baseline.
        times: A/A runs; 20 gives the rate in steps of 5%.
        store: where to record each A/A run (None: not recorded).
        wait_quiet_s: passed to :func:`workbench.runner.execute` for every run.
        on_run: called after each run with its index and summary row (a progress line).
    """
    from workbench import runner

    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise WorkbenchError(f"times={times!r} is invalid: use a positive number of A/A runs, e.g. 20")
    aa = replace(spec, technique=TechniqueSpec("baseline"))
    planned = runner.plan(aa)
    calibration = Calibration(aa)
    for index in range(times):
        result = runner.execute(planned, progress=False, wait_quiet_s=wait_quiet_s)
        if store is not None:
            store.append(result.to_row())
        comp = result.comparison
        row = {"run_id": result.run_id, "status": result.status, "failure_reason": result.failure_reason,
               "speedup": comp.get("speedup"), "ci_low": comp.get("ci_low"), "ci_high": comp.get("ci_high"),
               "verdict": verdict_of(comp) if comp else None, "noisy": result.noisy}
        calibration.runs.append(row)
        if on_run is not None:
            on_run(index, row)
    return calibration
