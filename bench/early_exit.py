"""Early exit on a zoo snippet classifier (BERT, or the pretrained MiniLM): the threshold curve, side by side.

Every threshold and the full model run interleaved call by call (full, t1, t2, ..., then reversed) on
the same batches in one process, so the speedups are ratios of calls that ran back to back. The exit
heads train on one half of the run's calibration split (held-out snippets that are never timed), the
curve is measured on the other half, and the operating point is chosen there; then the runner times
that operating point against the full model on the timed snippets, whose accuracy change is the
honest test of the choice.

Printed:
- one row per threshold (on the calibration half): accuracy, its change against the full model in
  points, mean layers executed, median latency per call, speedup over the full model with its 95%
  bootstrap interval;
- the operating point: the fastest threshold that loses at most ``--max-drop`` accuracy points there;
- the timed run on the held-out snippets: speedup with its interval and the accuracy change;
- the verdict against ``--target`` (speedup at most ``--max-drop`` points lost on the timed snippets),
  and the machine's load before and after (other processes on the cores make every ratio noisier).

The exit heads pool as the model does (``--pooling auto``: a sentence encoder's mean over non-padding
tokens, else the first token its head reads); ``--pooling first`` or ``mean`` overrides it.

Run: ``python bench/early_exit.py [--model zoo:minilm-l6] [--max-items 480] [--batch-size 16] [--repeats 3]
[--threads 1] [--target 1.3]``. Needs that zoo model built (``workbench zoo build NAME``); exit code 2
when it is not.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from workbench.models import zoo
from workbench.runner import run
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=480, help="timed snippets (as many again are the calibration split)")
    parser.add_argument("--batch-size", type=int, default=16, help="snippets per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per curve point")
    parser.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99", help="comma-separated")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the operating point may lose")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", default="zoo:code-classifier", help="a classifier (zoo:minilm-l6, a folder...)")
    parser.add_argument("--pooling", default="auto", choices=("auto", "first", "mean"), help="what the exit heads read")
    parser.add_argument("--target", type=float, default=1.3,
                        help="speedup the verdict asks for at <= --max-drop points")
    args = parser.parse_args()
    # 1. The zoo model, or how to build it.
    if args.model.startswith("zoo:"):
        try:
            zoo.model_dir(args.model[4:])
        except zoo.ZooError as exc:
            print(f"{exc}\nbuild it first: `workbench zoo build {args.model[4:]}`", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # 2. One run: heads and curve on the calibration split in prepare, then the timed comparison.
    params = {"thresholds": args.thresholds, "curve_repeats": args.repeats, "max_accuracy_drop_points": args.max_drop,
              "pooling": args.pooling}
    load_before = os.getloadavg()[0]
    spec = RunSpec(ModelSpec(args.model),
                   WorkloadSpec("code-snippets", max_items=args.max_items, batch_size=args.batch_size),
                   TechniqueSpec("early_exit", params), repeats=args.repeats)
    result = run(spec, progress=False)
    if result.status != "ok":
        print(f"the run failed: {result.failure_reason}", file=sys.stderr)
        return 1
    report = result.internals["technique"]
    # 3. Print.
    training = report["heads_training"]
    print(f"model: {args.model} ({report['num_layers']} layers, {result.internals['model_info']['parameters']:,} "
          f"parameters); heads on {training['items']} calibration snippets, curve on {training['curve_items']}, "
          f"{result.quality['inputs']} timed; batch {args.batch_size}, {args.repeats} timed passes, "
          f"{torch.get_num_threads()} threads")
    held_out = ", ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(training["per_layer_head_accuracy"]))
    print(f"exit heads read the {report['exit_pooling']['pooling']}-pooled hidden states "
          f"({report['exit_pooling']['decided_by']})")
    print(f"exit heads: {training['steps']} Adam steps in {training['seconds']:.1f} s; "
          f"accuracy per layer on the timed snippets: {held_out}")
    full = report["threshold_curve"][0]
    print(f"full model: accuracy {full['accuracy_full']:.4f}, median {1000 * full['median_latency_full_s']:.3f} ms "
          f"per call, {report['num_layers']} layers")
    print(f"{'threshold':>9} {'accuracy':>8} {'change_pts':>10} {'mean_layers':>11} {'median_ms':>9} "
          f"{'speedup':>7}  95% CI")
    for point in report["threshold_curve"]:
        change = 100 * (point["accuracy"] - point["accuracy_full"])
        print(f"{point['threshold']:>9.2f} {point['accuracy']:>8.4f} {change:>+10.2f} "
              f"{point['mean_layers_executed']:>11.2f} {1000 * point['median_latency_s']:>9.3f} "
              f"{point['speedup_vs_full']:>7.3f}  [{point['speedup_ci_low']:.3f}, {point['speedup_ci_high']:.3f}]")
    chosen = report["operating_point"]
    if "fallback" in chosen:
        print(f"operating point: none within {args.max_drop} points ({chosen['fallback']})")
    else:
        print(f"operating point (loses <= {args.max_drop} accuracy points): threshold {chosen['threshold']:.2f}, "
              f"speedup {chosen['speedup_vs_full']:.3f} [{chosen['speedup_ci_low']:.3f}, "
              f"{chosen['speedup_ci_high']:.3f}], mean layers {chosen['mean_layers_executed']:.2f} of "
              f"{report['num_layers']}, accuracy {chosen['accuracy']:.4f} vs {chosen['accuracy_full']:.4f}")
    comp, q = result.comparison, result.quality
    print(f"timed on the held-out snippets at that threshold: speedup {comp['speedup']:.3f} [{comp['ci_low']:.3f}, "
          f"{comp['ci_high']:.3f}] {comp['verdict']}, accuracy {q['accuracy_technique']:.4f} vs "
          f"{q['accuracy_baseline']:.4f} ({q['accuracy_change_points']:+.2f} points)")
    met = comp["speedup"] >= args.target and q["accuracy_change_points"] >= -args.max_drop
    print(f"target >= {args.target:.2f}x at <= {args.max_drop} accuracy points lost (timed snippets): "
          f"{'met' if met else 'NOT met'} (speedup {comp['speedup']:.3f}, 95% CI [{comp['ci_low']:.3f}, "
          f"{comp['ci_high']:.3f}], {q['accuracy_change_points']:+.2f} points)")
    noise = result.noise or {}
    flag = f": NOISY ({'; '.join(noise.get('reasons') or [])})" if result.noisy else ""
    print(f"machine: others used {noise.get('others_cores_during')} cores during the run (load average before "
          f"{load_before:.2f}, after {os.getloadavg()[0]:.2f}){flag}")
    print(f"note: {report['selection_note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
