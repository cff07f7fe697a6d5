"""A/A calibration: the baseline timed against itself 20 times; how often is the verdict "no practical
difference"?

Each of the 20 runs is a full measurement (`workbench.calibration.calibrate`, the same code as
`workbench calibrate`): the model loaded, warm-up, interleaved timed calls of two copies of the
baseline, the paired bootstrap interval and the verdict against the +-2% equivalence band. On a quiet
machine at least 95% of them must say "no practical difference" (exit code 1 otherwise). Contention is
measured during every run; a rate from a noisy machine is said to be one.

Run: ``python bench/calibration.py [--model zoo:code-classifier] [--workload code-snippets] [--times 20]``
(needs the zoo: ``make zoo``).
"""

from __future__ import annotations

import argparse
import sys

from workbench.calibration import REQUIRED_RATE, calibrate
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:code-classifier")
    parser.add_argument("--workload", default="code-snippets")
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--max-items", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--margin", type=float, default=2.0, help="equivalence band in percent")
    args = parser.parse_args()
    spec = RunSpec(ModelSpec(args.model), WorkloadSpec(args.workload, max_items=args.max_items,
                                                       max_new_tokens=args.max_new_tokens),
                   TechniqueSpec("baseline"), repeats=args.repeats, margin_percent=args.margin)
    result = calibrate(spec, times=args.times,
                       on_run=lambda i, r: print(f"  run {i + 1:>2}/{args.times}: {r['speedup']:.3f}x "
                                                 f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] {r['verdict']}"
                                                 + (" (noisy machine)" if r["noisy"] else ""), flush=True))
    print(result.text().splitlines()[1])
    if result.noisy_runs:
        print(f"verdict from a contended machine: {result.noisy_runs}/{args.times} runs were noisy")
    print(f"A/A rate of 'no practical difference': {result.rate:.0%} (required >= {REQUIRED_RATE:.0%})")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
