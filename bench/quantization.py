"""Quantization on the zoo LMs: forward and generate latency per scheme as ratios against fp32.

For each zoo language model (the deep narrow ``code-target``: 24 layers x 128; the wide shallow
``code-wide``: 2 layers x 512), every scheme that can run here is measured side by side with the
fp32 model in one process, calls interleaved (variant order rotates each round):

- forward: one pass over a 128-token prompt (prefill-like, matmul-bound);
- generate: greedy decoding of 32 new tokens from a short prompt (per-token, overhead-bound on tiny models);

with the perplexity change on held-out code (the code-prompts workload's text), mean next-token KL,
model bytes, and the share of linear-like layers really quantized. Schemes needing a GPU or a library
not installed are listed as skipped with the reason.

Check (exit code 1 when it fails): int8-dynamic reaches >= 2x forward speedup with < 2% perplexity
change on at least one zoo LM. The narrow code-target is reported as measured: with 128-wide matrices,
int8's quantize/dequantize overhead eats the gain.

Run: ``python bench/quantization.py [--repeats 5] [--models code-target,code-wide]`` (needs ``make zoo``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from workbench.measure import BASELINE, CallOutput, run_interleaved, summarize_samples
from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._quantize import SCHEMES, quantize_copy, why_not_scheme
from workbench.quality import copy_quality

MIN_SPEEDUP = 2.0  # int8-dynamic forward speedup asked for
MAX_PPL_CHANGE_PERCENT = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default="code-target,code-wide")
    parser.add_argument("--forward-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    built = {r.name: r for r in zoo.list_models()}
    missing = [n for n in names if n not in built or built[n].quick]
    if missing:
        print(f"full zoo model(s) {', '.join(missing)} not built here: run `make zoo` (or `workbench zoo build`)")
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
          f"{torch.backends.quantized.engine}; {args.repeats} repeats, interleaved")
    met = []
    for name in names:
        met.append(_bench_model(name, args))
    ok = any(met)
    print("PASS" if ok else f"FAIL: int8-dynamic reached neither {MIN_SPEEDUP}x nor < {MAX_PPL_CHANGE_PERCENT}% "
          "perplexity change on any zoo LM")
    return 0 if ok else 1


def _bench_model(name: str, args: argparse.Namespace) -> bool:
    # 1. The fp32 model, its quantized copies, and the inputs.
    model = load_model(ModelSpec(f"zoo:{name}"))
    workload = WorkloadSpec("code-prompts", max_items=16)
    spec = RunSpec(ModelSpec(f"zoo:{name}"), workload, TechniqueSpec("quantization"))
    variants, reports, skipped = {BASELINE: model.model}, {}, {}
    for scheme in SCHEMES:
        reason = why_not_scheme(scheme, "cpu")
        if reason:
            skipped[scheme] = reason
            continue
        variants[scheme], reports[scheme] = quantize_copy(model.model, scheme)
    prompts = _prompts(workload)
    long_ids = model.tokenizer("\n\n".join(prompts), return_tensors="pt").input_ids[:, : args.forward_tokens]
    short_ids = model.tokenizer(prompts[0], return_tensors="pt").input_ids
    pad = model.tokenizer.pad_token_id

    def forward(module):
        def call(i):
            with torch.inference_mode():
                module(input_ids=long_ids)
            return CallOutput(None)
        return call

    def generate(module):
        def call(i):
            with torch.inference_mode():
                out = module.generate(short_ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
            return CallOutput(None, new_tokens=out.shape[1] - short_ids.shape[1])
        return call

    # 2. Side by side: forward, then generate.
    timings = {}
    for kind, make in (("forward", forward), ("generate", generate)):
        calls = {v: make(m) for v, m in variants.items()}
        measured = run_interleaved(calls, n_items=1, repeats=args.repeats, warmup=1)
        timings[kind] = summarize_samples(measured.samples)
    # 3. Report.
    print(f"\nzoo:{name} ({model.info['parameters']:,} params, {model.info.get('layers')} layers x "
          f"{model.info.get('hidden_size')}); forward over {long_ids.shape[1]} tokens, generate {args.new_tokens} tokens")
    print(f"{'scheme':<18}{'library':<52}{'forward x [95% CI]':<24}{'generate x [95% CI]':<24}"
          f"{'ppl change':>11}{'KL':>9}{'MB':>7}  layers")
    base_mb = reports and next(iter(reports.values()))["bytes_before"] / 1e6
    print(f"{'fp32':<18}{'torch':<52}{'1.00 (reference)':<24}{'1.00 (reference)':<24}{'':>11}{'':>9}{base_mb:>7.2f}")
    met = False
    for scheme, report in reports.items():
        quality = copy_quality(model, variants[scheme], prompts, spec.device, 2048)
        f, g = timings["forward"]["comparisons"][scheme], timings["generate"]["comparisons"][scheme]
        print(f"{scheme:<18}{report['library'][:50]:<52}{_ratio(f):<24}{_ratio(g):<24}"
              f"{quality['perplexity_change_percent']:>+10.2f}%{quality['next_token_kl_mean']:>9.4f}"
              f"{report['bytes_after'] / 1e6:>7.2f}  {report['quantized_layers']}/{report['linear_layers']}")
        if scheme == "int8-dynamic":
            met = f["speedup"] >= MIN_SPEEDUP and abs(quality["perplexity_change_percent"]) < MAX_PPL_CHANGE_PERCENT
            print(f"  int8-dynamic on {name}: forward {f['speedup']:.2f}x (asked >= {MIN_SPEEDUP}x), perplexity "
                  f"{quality['perplexity_change_percent']:+.2f}% (asked < {MAX_PPL_CHANGE_PERCENT}%): "
                  f"{'meets' if met else 'does not meet'} the target")
    for scheme, reason in skipped.items():
        print(f"{scheme:<18}skipped: {reason}")
    return met


def _ratio(comp: dict) -> str:
    return f"{comp['speedup']:.2f} [{comp['ci_low']:.2f}, {comp['ci_high']:.2f}]"


def _prompts(workload: WorkloadSpec) -> list[str]:
    from workbench.workloads import load_workload

    return [item["prompt"] for item in load_workload(workload).items]


if __name__ == "__main__":
    sys.exit(main())
