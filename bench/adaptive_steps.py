"""Adaptive diffusion steps on the zoo's digits pipeline: fixed step counts vs per-prompt policies.

Fixed 10/20/30/50/100 steps, the ``predictor`` policy (a tree trained in prepare on a step sweep of
training seeds disjoint from the evaluated ones) and the ``convergence`` policy (stop when the
predicted clean image stops changing, on a 50-step schedule) run on the same loaded pipeline, the same
digits and the same seeds, interleaved call by call in one process, so the speed ratios are measured
side by side. Quality beside speed: SSIM against the 100-step reference of the same seed, and the
digits judge's accuracy on the class that was asked for.

Printed: one row per variant (mean steps, images/s, speedup over fixed-50 and fixed-100 with their 95%
paired-bootstrap intervals, SSIM mean and minimum, judge accuracy), the predictor's cross-validated
error, and one PASS/FAIL line per policy for the target (after StepSaver, about 3x faster than fixed
100 steps at nearly the same FID): SSIM >= 0.9 against the reference, no loss of judge accuracy
against fixed-50, and at least 2x fewer steps than fixed-50. Exit code 1 when no policy meets it.

Run: ``python bench/adaptive_steps.py [--max-items 40] [--repeats 2] [--threads 1]``.
Needs the full zoo (``make zoo`` or ``workbench zoo build``); exit code 2 when it is not built.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from workbench import quality
from workbench.measure import run_interleaved, summarize_samples
from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.runner import build_trial, plan
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._execute import draw
from workbench.techniques.adaptive_steps import AdaptiveSteps

FIXED_STEPS = (10, 20, 30, 50, 100)
BASELINE_STEPS = 50  # the target compares with fixed-50
SSIM_FLOOR = 0.9  # mean SSIM against the 100-step reference
STEP_RATIO = 2.0  # at least this many times fewer steps than fixed-50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=40, help="digits drawn (classes 0-9 in turn, one seed each)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the digits")
    parser.add_argument("--train-seeds", type=int, default=8, help="predictor: training seeds per class")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="convergence: tolerance (default: the technique's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    # 1. The full zoo's digits pipeline and judge, or how to build them.
    built = {r.name: r for r in zoo.list_models()}
    if any(name not in built or built[name].quick for name in ("digits-diffusion", "digits-judge")):
        print("the full zoo's digits-diffusion and digits-judge are not built here: run `make zoo` "
              "(or `workbench zoo build`) first", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # 2. Both policies prepared on one pipeline (the predictor's sweep runs here, untimed).
    model = load_model(ModelSpec("zoo:digits-diffusion"))
    pipe = model.model
    workload = WorkloadSpec("digits", max_items=args.max_items, batch_size=1, num_inference_steps=BASELINE_STEPS)
    policy_params = {"predictor": {"policy": "predictor", "train_seeds": args.train_seeds},
                     "convergence": {"policy": "convergence",
                                     **({} if args.tolerance is None else {"tolerance": args.tolerance})}}
    techniques = {}
    for policy, params in policy_params.items():
        technique = AdaptiveSteps(**params)
        spec = RunSpec(model.spec, workload, TechniqueSpec("adaptive_steps", params))
        technique.prepare(build_trial(plan(spec), model=model))
        techniques[policy] = technique
    predictor = techniques["predictor"]
    batches, judge = predictor.batches_, predictor.judge_
    references = [predictor.reference_by_seed_[s] for b in batches for s in b.seeds]
    intended = np.array([c for b in batches for c in b.class_labels])
    # 3. Every variant on every digit, interleaved call by call.
    calls = {f"fixed-{k}": (lambda k: lambda i: draw(pipe, batches[i], k))(k) for k in FIXED_STEPS}
    calls.update({policy: (lambda t: lambda i: t.run(batches[i]))(t) for policy, t in techniques.items()})
    try:
        measured = run_interleaved(calls, len(batches), args.repeats, warmup=1, track_memory=False)
    finally:
        reports = {policy: t.internals([]) for policy, t in techniques.items()}
        for technique in techniques.values():
            technique.release()
    # 4. Speed, steps and quality per variant.
    vs50 = summarize_samples(measured.samples, baseline=f"fixed-{BASELINE_STEPS}")["comparisons"]
    vs100 = summarize_samples(measured.samples, baseline="fixed-100")["comparisons"]
    rows = {}
    for name in calls:
        images = [im for out in measured.outputs[name] for im in out]
        steps = [s for call in measured.internals[name] for s in call.get("steps", [])] or \
            [int(name.split("-")[1])]
        similarity = quality.reference_similarity(references, images)
        latency = np.asarray(measured.samples[name]["latency_s"])
        rows[name] = {
            "steps": float(np.mean(steps)),
            "images_per_s": len(latency) * batches[0].size / latency.sum(),
            "ssim": similarity["ssim_mean"], "ssim_min": similarity["ssim_min"],
            "judge": float((judge.predict(np.stack(images)) == intended).mean()),
            "vs50": vs50.get(name), "vs100": vs100.get(name),
        }
    # 5. Print.
    print(f"model: zoo:digits-diffusion ({model.info['parameters']:,} parameters, "
          f"{type(pipe.scheduler).__name__}); {len(batches)} digits, batch 1, {args.repeats} timed passes, "
          f"{torch.get_num_threads()} threads; reference: 100 steps, same seeds")
    print(f"{'variant':>12} {'steps':>6} {'images/s':>8} {'x_vs_50':>7} {'95% CI':>15} {'x_vs_100':>8} "
          f"{'95% CI':>15} {'ssim':>6} {'ssim_min':>8} {'judge':>6}")
    for name, row in rows.items():
        print(f"{name:>12} {row['steps']:>6.1f} {row['images_per_s']:>8.1f} {ratio(row['vs50'], 7)} "
              f"{ratio(row['vs100'], 8)} {row['ssim']:>6.3f} {row['ssim_min']:>8.3f} {row['judge']:>6.3f}")
    fit = predictor.predictor_
    print(f"predictor: {fit['training_images']} training images ({args.train_seeds} seeds per class, disjoint "
          f"from the evaluated seeds: {fit['seeds_disjoint']}), sweep + fit {fit['seconds']:.1f} s; mean label "
          f"{fit['training_label_steps_mean']:.2f} steps; cross-validated ({fit['cv_folds']} folds): MAE "
          f"{fit['cv_mae_steps']:.2f} steps, under-predicted {fit['cv_under_prediction_rate']:.1%}, held-out SSIM "
          f"{fit['cv_ssim_mean']:.3f}, target met {fit['cv_ssim_target_met_rate']:.1%}")
    converge = reports["convergence"]
    print(f"convergence: tolerance {converge['tolerance']}, planned {converge['max_steps']} steps")
    base = rows[f"fixed-{BASELINE_STEPS}"]
    met = []
    for policy in techniques:
        row = rows[policy]
        most_steps = BASELINE_STEPS / STEP_RATIO
        checks = {f"SSIM {row['ssim']:.3f} >= {SSIM_FLOOR}": row["ssim"] >= SSIM_FLOOR,
                  f"judge {row['judge']:.3f} >= fixed-{BASELINE_STEPS}'s {base['judge']:.3f}":
                      row["judge"] >= base["judge"],
                  f"steps {row['steps']:.1f} <= {most_steps:g}": row["steps"] <= most_steps}
        ok = all(checks.values())
        met.append(ok)
        failed = [c for c, passed in checks.items() if not passed]
        verdict = "" if ok else f" (failed: {'; '.join(failed)})"
        print(f"{'PASS' if ok else 'FAIL'} {policy}: " + "; ".join(checks) + verdict)
    return 0 if any(met) else 1


def ratio(comparison: dict | None, width: int) -> str:
    """A speedup and its interval, or 1 for the variant compared with itself."""
    if comparison is None:
        return f"{'1':>{width}} {'':>15}"
    return f"{comparison['speedup']:>{width}.2f} [{comparison['ci_low']:5.2f}, {comparison['ci_high']:5.2f}]"


if __name__ == "__main__":
    sys.exit(main())
