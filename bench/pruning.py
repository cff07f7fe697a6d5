"""Pruning on zoo models: structured (heads and FFN neurons removed) and magnitude (weights zeroed), side by side.

For each model, every point is prepared by the ``pruning`` technique itself on the run's calibration split
(importance ranked on inputs that are never timed), then every point and the unpruned model are timed
interleaved call by call in one process (variant order alternating each call):

- causal LMs: ``forward``, one pass over a ``--forward-tokens`` prompt (prefill-like, matmul-bound), and
  ``generate``, greedy decoding of ``--new-tokens`` from each timed prompt (tokens/s, overhead-bound on
  small models);
- classifiers: batch classification of the timed snippets.

Printed per point: heads and FFN neurons removed, parameters kept, model MB, each speedup over the
unpruned model with its 95% bootstrap interval, and the quality change beside it (perplexity change and
next-token KL on the timed prompts' text for LMs; accuracy change in points and label KL for classifiers).
Magnitude pruning also prints its zero share and the bytes its zeros would take in CSR.

Check (exit code 1 when it fails): structured pruning is measurably faster (the 95% interval's low end
above 1.0x) at some point on some model and mode. Magnitude pruning's interval is printed as the finding
either way (dense kernels multiply its zeros too, so it should include 1.0x).

Run: ``WORKBENCH_DATA=/tmp/fresh26/data python bench/pruning.py [--models code-target,minilm-l6]
[--fractions 0,0.25,0.5] [--magnitude 0.5] [--repeats 3] [--threads 1] [--recovery-steps 0]``
(``smollm2-135m`` can be added to ``--models``). About 2.5 minutes with the defaults on 2 contended
cores. Each model must be built (``workbench zoo build NAME``): exit code 2 when it is not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from workbench import runner
from workbench.measure import BASELINE, CallOutput, run_interleaved, summarize_samples
from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._execute import classify, generate
from workbench.techniques.base import Outcome
from workbench.techniques.pruning import Pruning


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="code-target,minilm-l6", help="zoo names (LMs and classifiers)")
    parser.add_argument("--fractions", default="0,0.25,0.5", help="structured points: heads and neurons share removed")
    parser.add_argument("--magnitude", type=float, default=0.5, help="magnitude point's sparsity (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the inputs")
    parser.add_argument("--lm-items", type=int, default=3, help="timed prompts (as many again calibrate)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--forward-tokens", type=int, default=128)
    parser.add_argument("--classifier-items", type=int, default=64, help="timed snippets (as many again calibrate)")
    parser.add_argument("--batch-size", type=int, default=16, help="snippets per classification call")
    parser.add_argument("--recovery-steps", type=int, default=0, help="recovery fine-tune steps per point")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine; "
                        "0: torch's default)")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        try:
            zoo.model_dir(name)
        except zoo.ZooError as exc:
            print(f"{exc}\nbuild it first: `workbench zoo build {name}` (WORKBENCH_DATA="
                  f"{os.environ.get('WORKBENCH_DATA', 'unset')})", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} timed passes, interleaved; "
          f"load average {load_before:.2f} on {os.cpu_count()} cores")
    structured_faster, magnitude_findings = [], []
    for name in names:
        faster, finding = _bench_model(name, args)
        structured_faster += faster
        magnitude_findings += finding
    load_after = os.getloadavg()[0]
    contended = max(load_before, load_after) > 0.5 * (os.cpu_count() or 1)
    print(f"\nmachine: load average before {load_before:.2f}, after {load_after:.2f} on {os.cpu_count()} cores"
          + (": CONTENDED, the intervals are wider and the ratios noisier than on a quiet machine" if contended
             else ""))
    for line in magnitude_findings:
        print(f"finding: {line}")
    if structured_faster:
        print(f"PASS: structured pruning measurably faster (95% CI above 1.0x) at {'; '.join(structured_faster)}")
        return 0
    print("FAIL: structured pruning was not measurably faster (95% CI above 1.0x) at any point here")
    return 1


def _points(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    points = {}
    for fraction in (float(f) for f in args.fractions.split(",") if f.strip()):
        points[f"structured {100 * fraction:.0f}%"] = {"heads_fraction": fraction, "neurons_fraction": fraction}
    if args.magnitude > 0:
        points[f"magnitude {100 * args.magnitude:.0f}%"] = {"method": "magnitude",
                                                            "magnitude_sparsity": args.magnitude}
    return {label: {**params, "recovery_steps": args.recovery_steps} for label, params in points.items()}


def _bench_model(name: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    # 1. The model, the timed and calibration batches (as a run builds them), and every point prepared.
    start_s = time.perf_counter()
    model = load_model(ModelSpec(f"zoo:{name}"))
    is_lm = model.kind == "causal_lm"
    workload = (WorkloadSpec("code-prompts", max_items=args.lm_items, max_new_tokens=args.new_tokens) if is_lm
                else WorkloadSpec("code-snippets", max_items=args.classifier_items, batch_size=args.batch_size))
    trial = runner.build_trial(runner.plan(RunSpec(ModelSpec(f"zoo:{name}"), workload, TechniqueSpec("pruning"))),
                               model=model)
    points = {label: Pruning(**params) for label, params in _points(args).items()}
    for technique in points.values():
        technique.prepare(trial)
    prepare_s = time.perf_counter() - start_s
    # 2. Side by side: every point and the unpruned model, interleaved per mode.
    modes = _modes(model, trial, points, args)
    timings, outputs = {}, {}
    for mode, calls in modes.items():
        measured = run_interleaved(calls, len(trial.batches), args.repeats, warmup=1, track_memory=False)
        timings[mode] = summarize_samples(measured.samples)["comparisons"]
        outputs[mode] = measured.outputs
    # 3. Each point's own report (what it removed, its quality), then the table.
    labels = [y for b in trial.batches for y in (b.labels or [])]
    info = model.info
    print(f"\nzoo:{name} ({info['family']}, {info['parameters']:,} parameters, {info.get('layers')} layers x "
          f"{info.get('hidden_size')}): {len(trial.batches)} timed batches, importance on {len(trial.calibration)} "
          f"calibration batches (never timed); loading and preparing {len(points)} points took {prepare_s:.1f} s")
    header = f"{'point':<16}{'heads removed':>14}{'neurons removed':>17}{'params kept':>12}{'MB':>7}"
    header += "".join(f"  {mode + ' x [95% CI]':<24}" for mode in modes)
    print(header + ("  ppl change    KL" if is_lm else "  accuracy change  label KL"))
    print(f"{'unpruned':<16}{'':>14}{'':>17}{'100.0%':>12}{info['model_bytes'] / 1e6:>7.2f}"
          + "".join(f"  {'1.00 (reference)':<24}" for _ in modes))
    faster, findings = [], []
    for label, technique in points.items():
        first = next(iter(modes))
        report = technique.report(Outcome(per_call=[], baseline_outputs=outputs[first][BASELINE],
                                          technique_outputs=outputs[first][label], standard_quality={}))
        done, metrics = report.internals, {m.name: m.value for m in report.quality}
        structured = done["method"] == "structured"
        removed = ((f"{done['heads_removed']}/{done['heads_total']}",
                    f"{done['neurons_removed']}/{done['neurons_total']}") if structured
                   else (f"{100 * done['sparsity_achieved']:.0f}% zeros", "same shapes"))
        row = (f"{label:<16}{removed[0]:>14}{removed[1]:>17}{100 * done['parameters_kept_fraction']:>11.1f}%"
               f"{report.model_bytes / 1e6:>7.2f}")
        for mode in modes:
            comp = timings[mode][label]
            row += f"  {_ratio(comp):<24}"
            if structured and comp["ci_low"] > 1.0:
                faster.append(f"{name} {mode} {label} ({comp['speedup']:.2f}x)")
            if not structured:
                includes = comp["ci_low"] <= 1.0 <= comp["ci_high"]
                findings.append(f"{name} {mode} {label}: {_ratio(comp)} "
                                + ("includes 1.0x: no time saved, as dense kernels multiply the zeros too" if includes
                                   else "excludes 1.0x on this machine (noise, or a dense-kernel effect of the zeros)"))
        if is_lm:
            row += f"  {metrics['perplexity_change_percent']:>+9.2f}% {metrics['next_token_kl_mean']:>7.4f}"
        else:
            row += f"  {_accuracy_change(outputs[first], label, labels):>+13.2f} pt {metrics['label_kl_mean']:>9.4f}"
        print(row)
        if done.get("recovery"):
            rec = done["recovery"]
            print(f"{'':<16}recovery: {rec['steps']} steps, calibration {rec['loss']} {rec['loss_before']:.3f} -> "
                  f"{rec['loss_after']:.3f}")
        if not structured:
            print(f"{'':<16}CSR of the pruned layers: {done['pruned_layers_csr_bytes'] / 1e6:.2f} MB (int64 indices), "
                  f"{done['pruned_layers_csr_int32_bytes'] / 1e6:.2f} MB (int32), against "
                  f"{done['pruned_layers_dense_bytes'] / 1e6:.2f} MB dense")
        technique.release()
    return faster, findings


def _modes(model: Any, trial: Any, points: dict[str, Pruning], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """mode -> variant -> call(item): the unpruned model first, then every point."""
    modules = {BASELINE: model.model, **{label: t._pruned for label, t in points.items()}}
    if model.kind != "causal_lm":
        return {"classify": {v: (lambda m: lambda i: classify(m, trial.batches[i]))(m) for v, m in modules.items()}}
    text = "\n\n".join(trial.texts)
    ids = model.tokenizer(text, return_tensors="pt").input_ids[:, :args.forward_tokens]

    def forward(module: Any):
        def call(i: int) -> CallOutput:
            with torch.inference_mode():
                module(input_ids=ids)
            return CallOutput(None)
        return call

    def decode(module: Any):
        return lambda i: generate(module, model.tokenizer, trial.batches[i], args.new_tokens)

    return {"forward": {v: forward(m) for v, m in modules.items()},
            "generate": {v: decode(m) for v, m in modules.items()}}


def _accuracy_change(outputs: dict[str, list[Any]], label: str, labels: list[int]) -> float:
    """Accuracy points of a point minus the unpruned model's, on the timed snippets' gold labels."""
    def accuracy(name: str) -> float:
        predicted = [y for batch in outputs[name] for y in batch]
        return 100.0 * sum(p == y for p, y in zip(predicted, labels)) / max(len(labels), 1)
    return accuracy(label) - accuracy(BASELINE)


def _ratio(comp: dict[str, Any]) -> str:
    return f"{comp['speedup']:.2f} [{comp['ci_low']:.2f}, {comp['ci_high']:.2f}]"


if __name__ == "__main__":
    sys.exit(main())
