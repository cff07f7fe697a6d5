"""How much does the harness itself cost? Harness vs a bare perf_counter loop over the same call.

The call is the baseline technique generating 16 tokens greedily with a real (randomly initialised,
seeded) GPT-2 from transformers. Blocks of calls alternate (bare, harness, harness, bare, ...) so drift
cancels; the ratios are computed from blocks run side by side in this one process.

Printed:
- wall ratio: wall time per call of the harness loop (clocks, device sync, peak-memory tracking,
  sample bookkeeping, progress hook) over the bare loop's; the figure held to <= 1.02.
- reported ratio: the median latency the harness records over the bare loop's median latency.

Run: ``python bench/overhead.py [--calls 40] [--rounds 6]``. Exit code 1 when the wall ratio > 1.02.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.measure import run_interleaved
from workbench.models.loading import LoadedModel, describe_module
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.base import Trial
from workbench.techniques.baseline import Baseline
from workbench.workloads import Batch, Workload

LIMIT = 1.02


def make_call() -> callable:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(config).eval()

    class Tok:  # the two attributes generate() needs from a tokenizer
        pad_token_id = 0
        eos_token_id = None

    loaded = LoadedModel(ModelSpec("bench:gpt2-random"), "causal_lm", model, Tok(), "cpu", "float32", "-",
                         describe_module(model))
    spec = RunSpec(ModelSpec("bench:gpt2-random"), WorkloadSpec("bench", max_new_tokens=16),
                   TechniqueSpec("baseline"))
    baseline = Baseline()
    ids = torch.randint(1, 512, (1, 24))
    batch = Batch(1, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["random prompt"])
    # a random model has no files to plan from: the trial is built by hand, with no facts
    baseline.prepare(Trial(spec=spec, facts=None, model=loaded, draft=None,
                           workload=Workload("bench", "text-generation", [{"prompt": "random prompt"}]), batches=[batch]))
    return lambda: baseline.run(batch)


def bare_block(call: callable, calls: int) -> tuple[float, list[float]]:
    samples = []
    start_block = time.perf_counter()
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return time.perf_counter() - start_block, samples


def harness_block(call: callable, calls: int) -> tuple[float, list[float]]:
    done = []
    start_block = time.perf_counter()
    result = run_interleaved({"baseline": lambda item: call()}, n_items=1, repeats=calls, warmup=0,
                             on_progress=done.append)
    return time.perf_counter() - start_block, result.samples["baseline"]["latency_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls per block")
    parser.add_argument("--rounds", type=int, default=6, help="bare/harness block pairs")
    args = parser.parse_args()
    call = make_call()
    for _ in range(5):  # warm-up, not counted
        call()
    wall = {"bare": 0.0, "harness": 0.0}
    samples: dict[str, list[float]] = {"bare": [], "harness": []}
    for round_ in range(args.rounds):
        order = ("bare", "harness") if round_ % 2 == 0 else ("harness", "bare")
        for name in order:
            block = bare_block if name == "bare" else harness_block
            seconds, latencies = block(call, args.calls)
            wall[name] += seconds
            samples[name].extend(latencies)
    calls = args.calls * args.rounds
    wall_ratio = wall["harness"] / wall["bare"]
    reported_ratio = statistics.median(samples["harness"]) / statistics.median(samples["bare"])
    print(f"call: GPT-2 (4 layers, 128 wide, random weights) greedy 16 tokens; {calls} calls per side")
    print(f"bare loop     wall per call {1000 * wall['bare'] / calls:8.3f} ms   median {1000 * statistics.median(samples['bare']):8.3f} ms")
    print(f"harness loop  wall per call {1000 * wall['harness'] / calls:8.3f} ms   median {1000 * statistics.median(samples['harness']):8.3f} ms")
    print(f"harness overhead wall ratio     {wall_ratio:.4f}  (limit {LIMIT})")
    print(f"harness overhead reported ratio {reported_ratio:.4f}")
    if wall_ratio > LIMIT:
        print(f"FAIL: harness overhead {wall_ratio:.4f} > {LIMIT}")
        return 1
    print("OK: harness overhead within limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
