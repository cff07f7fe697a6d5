"""Quantization inside a perplexity budget: int8-dynamic on SmolLM2-135M with the sensitive layers kept float.

Whole-model int8-dynamic on zoo:smollm2-135m decodes ~2.5x faster per token but costs +168% perplexity.
This runs the quantization technique with ``keep_float=auto`` through the package's runner:

1. in prepare, on the calibration split (never timed): a per-layer sensitivity scan (one linear layer
   quantized at a time), then the greedy search (most sensitive layers kept float until the whole
   model's calibration perplexity change is within the budget), then the curve: greedy steps timed side
   by side with float, interleaved, per output token;
2. the timed run: the chosen configuration against the float baseline on the timed prompts, with
   perplexity change and KL on their text.

It prints the scan (most sensitive layers, and per kind), the curve and the verdict for the
acceptance line: the search finds an int8 configuration with >= 1.5x decode at <= 2% perplexity change,
or shows the curve proving none exists (every greedy step with fewer float layers is over the budget,
and the one within it is slower than 1.5x). Exit 1 only when the run itself fails.

Run: ``WORKBENCH_DATA=... python bench/quantization_sensitivity.py [--max-items 16] [--repeats 3]``
(needs zoo:smollm2-135m built: ``workbench zoo build smollm2-135m``). About 10 minutes with --max-items 8 on 2 quiet cores
(the scan is one pass over the calibration text per linear layer: 211 here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

from workbench.models import zoo
from workbench.runner import execute, plan
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

MIN_SPEEDUP = 1.5  # per-token decode speedup asked for
MODEL = "zoo:smollm2-135m"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-items", type=int, default=16, help="timed prompts; the calibration split is as large")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the final run")
    parser.add_argument("--budget", type=float, default=2.0, help="max perplexity change, percent")
    parser.add_argument("--curve-points", type=int, default=6)
    parser.add_argument("--curve-repeats", type=int, default=1)
    args = parser.parse_args()
    if not any(r.name == MODEL.split(":")[1] and not r.quick for r in zoo.list_models()):
        print(f"{MODEL} is not built here: run `workbench zoo build smollm2-135m`")
        return 2
    # 1. The run, through the package's runner (prepare holds the scan, the search and the curve).
    print(f"load before: {_load()}")
    params = {"scheme": "int8-dynamic", "keep_float": "auto", "max_perplexity_change_percent": args.budget,
              "curve_points": args.curve_points, "curve_repeats": args.curve_repeats}
    spec = RunSpec(ModelSpec(MODEL), WorkloadSpec("code-prompts", max_items=args.max_items,
                                                  max_new_tokens=args.max_new_tokens),
                   TechniqueSpec("quantization", params), repeats=args.repeats)
    started = time.perf_counter()
    result = execute(plan(spec), progress=False)
    print(f"load after: {_load()}; run took {time.perf_counter() - started:.0f} s; threads "
          f"{result.environment.get('torch_threads')}; noise {_noise(result.noise)}")
    if result.status != "ok":
        print(f"FAIL: the run failed: {result.failure_reason}")
        return 1
    tech = result.internals["technique"]
    search = tech["sensitivity_search"]
    # 2. The scan: the most sensitive layers, and per kind.
    sensitivity = search["per_group_perplexity_change_percent"]
    print(f"\nscan: {search['groups']} groups ({search['grouping']}), {search['calibration_tokens']} calibration "
          f"tokens, {search['scan_seconds']:.0f} s; greedy {len(search['steps'])} steps, "
          f"{search['greedy_seconds']:.0f} s")
    print("most sensitive (perplexity change with only that layer int8):")
    for name, change in sorted(sensitivity.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {change:+8.2f}%  {name}")
    kinds = defaultdict(list)
    for name, change in sensitivity.items():
        kinds[name.rsplit(".", 1)[-1]].append(change)
    print("per kind: " + ", ".join(f"{kind} max {max(v):+.2f}% sum {sum(v):+.2f}%"
                                   for kind, v in sorted(kinds.items(), key=lambda kv: -max(kv[1]))))
    steps = search["steps"]
    print("greedy steps measured (layers kept float: calibration perplexity change): " + ", ".join(
        f"{s['kept_float']}: {s['perplexity_change_percent']:+.1f}%" for s in steps))
    # 3. The curve, timed side by side with float on the calibration prompts.
    print(f"\ncurve (calibration prompts, {args.curve_repeats} timed pass(es), interleaved with float):")
    print(f"{'kept float':>10}{'int8 layers':>12}{'ppl change':>12}{'decode x vs float [95% CI]':>30}")
    for p in search["curve"]:
        print(f"{p['kept_float']:>10}{p['quantized_layers']:>12}{p['perplexity_change_percent']:>+11.2f}%"
              f"{p['speedup_vs_float']:>14.2f} [{p['speedup_ci_low']:.2f}, {p['speedup_ci_high']:.2f}]")
    point = search["operating_point"]
    print(f"operating point: {point['kept_float']} layers kept float "
          f"({', '.join(tech['kept_float'][:8])}{' ...' if len(tech['kept_float']) > 8 else ''})")
    # 4. The timed run: the chosen configuration against the float baseline, quality on the timed text.
    c, q = result.comparison, result.quality
    print(f"\ntimed run ({args.max_items} prompts x {args.repeats}): decode {c['speedup']:.2f}x per output token "
          f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}] ({c.get('basis')}); perplexity {q['perplexity_baseline']:.2f} -> "
          f"{q['perplexity_technique']:.2f} ({q['perplexity_change_percent']:+.2f}%) on {q['quality_text_tokens']} "
          f"timed-text tokens, next-token KL {q['next_token_kl_mean']:.4f}; weights {tech['compression']:.2f}x smaller")
    print(result.report["headline"])
    # 5. The verdict.
    within = q["perplexity_change_percent"] <= args.budget
    if c["speedup"] >= MIN_SPEEDUP and within:
        print(f"VERDICT: FOUND an int8 configuration with {c['speedup']:.2f}x decode (>= {MIN_SPEEDUP}x) at "
              f"{q['perplexity_change_percent']:+.2f}% perplexity (<= {args.budget}%) on the timed text")
    else:
        faster = [p for p in search["curve"] if p["speedup_vs_float"] >= MIN_SPEEDUP]
        over = all(p["perplexity_change_percent"] > args.budget for p in faster)
        print(f"VERDICT: NONE FOUND: the configuration within the budget decodes {c['speedup']:.2f}x "
              f"(timed text perplexity {q['perplexity_change_percent']:+.2f}%); "
              + (f"every curve point at >= {MIN_SPEEDUP}x is over {args.budget}% on calibration text "
                 f"({', '.join(_point_text(p) for p in faster)})"
                 if faster and over else "see the curve above"))
    return 0


def _point_text(point: dict) -> str:
    return f"{point['kept_float']} float: {point['perplexity_change_percent']:+.1f}%"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def _noise(noise: dict | None) -> str:
    if not noise:
        return "not measured"
    keys = [k for k in ("others_cores_before", "others_cores_during", "noisy", "reasons") if k in noise]
    return ", ".join(f"{k} {noise[k]}" for k in keys) or str(noise)[:200]


if __name__ == "__main__":
    sys.exit(main())
