"""Early exit on the zoo's BERT snippet classifier: the threshold curve, measured side by side.

Every threshold and the full model run interleaved call by call (full, t1, t2, ..., then reversed) on
the same batches in one process, so the speedups are ratios of calls that ran back to back. Exit
heads are trained on the workload itself, cross-fitted over two folds (a head never judges an item
whose label it saw); the operating point is chosen on those same items.

Printed:
- one row per threshold: accuracy, its change against the full model in points, mean layers
  executed, median latency per call, speedup over the full model with its 95% bootstrap interval;
- the operating point: the fastest threshold that loses at most ``--max-drop`` accuracy points.

Run: ``python bench/early_exit.py [--max-items 480] [--batch-size 16] [--repeats 3] [--threads 1]``.
Needs the full zoo (``make zoo`` or ``workbench zoo build``); exit code 2 when it is not built.
"""

from __future__ import annotations

import argparse
import sys

import torch

from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.runner import build_trial, plan
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.early_exit import EarlyExit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=480, help="labelled snippets (heads train on them, cross-fitted)")
    parser.add_argument("--batch-size", type=int, default=16, help="snippets per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per curve point")
    parser.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99", help="comma-separated")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the operating point may lose")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    # 1. The full zoo's classifier, or how to build it.
    try:
        zoo.model_dir("code-classifier")
    except zoo.ZooError as exc:
        print(f"{exc}\nbuild the full zoo first: `make zoo` (or `workbench zoo build`)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # 2. Prepare early exit: train the heads, then measure the curve side by side.
    params = {"thresholds": args.thresholds, "curve_repeats": args.repeats, "max_accuracy_drop_points": args.max_drop}
    spec = RunSpec(ModelSpec("zoo:code-classifier"),
                   WorkloadSpec("code-snippets", max_items=args.max_items, batch_size=args.batch_size),
                   TechniqueSpec("early_exit", params), repeats=args.repeats)
    model = load_model(spec.model)
    technique = EarlyExit(**params)
    technique.prepare(build_trial(plan(spec), model=model))
    report = technique.internals([])
    technique.release()
    # 3. Print.
    training = report["heads_training"]
    print(f"model: zoo:code-classifier ({report['num_layers']} layers, {model.info['parameters']:,} parameters); "
          f"{training['items']} snippets, batch {args.batch_size}, {args.repeats} timed passes per point, "
          f"{torch.get_num_threads()} threads")
    held_out = ", ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(training["per_layer_head_accuracy"]))
    print(f"exit heads: {training['steps']} Adam steps in {training['seconds']:.1f} s; "
          f"cross-fitted accuracy per layer: {held_out}")
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
    print(f"note: {report['selection_note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
