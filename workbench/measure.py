"""The measurement harness: timed, interleaved, synchronised calls, and their statistics.

Rules (DESIGN.md, "Measurement rules"): warm-up calls are never counted; the device is synchronised
before every clock read; the baseline and the technique alternate call by call (A B, then B A, ...)
so drift and order effects cancel; every raw sample is kept; statistics are distributions (median,
p90, p99, CV%) and the speedup carries a paired bootstrap 95% confidence interval.

Everything here returns data. :func:`summarize_samples` is a pure function of the raw samples, so a
stored run's statistics can be recomputed from its stored samples and must agree.

Example:
    >>> import time
    >>> calls = {"baseline": lambda i: CallOutput(time.sleep(0.001)), "fast": lambda i: CallOutput(None)}
    >>> result = run_interleaved(calls, n_items=2, repeats=3, warmup=1)
    >>> summary = summarize_samples(result.samples)
    >>> summary["comparison"]["speedup"] > 1.0
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # two-sided level of every interval reported
BOOTSTRAP_RESAMPLES = 2000  # resamples for the speedup interval; 2000 keeps the CI edges stable to ~1%
BASELINE = "baseline"  # name of the reference variant in samples and summaries
MARGIN_PERCENT = 2.0  # equivalence band: a speedup within +-2% is "no practical difference" (settable)
NO_DIFFERENCE = "no practical difference"  # the verdict when the interval does not clear the band


# ----------------------------------------------------------------------------------------------
# Clocks and memory


def synchronize(device: str) -> None:
    """Wait for queued device work, so a clock read after it sees finished work."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one call: CUDA peak allocated on GPU, peak resident set (RSS) on CPU (Linux).

    On CPU the kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` before the
    call and read after it; the figure is the peak above the resident memory at the start, in bytes.
    Where that is not possible (not Linux, or not permitted) :meth:`stop` returns None: a missing
    figure, never an invented one.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._start_bytes: int | None = None
        self.cpu_supported = _reset_cpu_peak()

    def start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.cpu_supported:
            _reset_cpu_peak()
            self._start_bytes = _read_status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        if self._start_bytes is None:
            return None
        if self.device.startswith("cuda"):
            import torch

            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _read_status_kib("VmHWM") * 1024
        return max(0, peak - self._start_bytes)


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


# ----------------------------------------------------------------------------------------------
# Running calls


@dataclass
class CallOutput:
    """What one call of a variant returns to the harness.

    ``first_output_at`` is the ``time.perf_counter()`` reading when the first output token was ready
    (set by a streamer), so time to first token is measured at the token, not at a logits hook.
    """

    output: Any  # the call's outputs (token ids per input, labels, image arrays)
    new_tokens: int | None = None  # output tokens produced by this call (all inputs of the batch)
    first_output_at: float | None = None  # perf_counter() seconds when the first new token was ready
    internals: dict[str, Any] = field(default_factory=dict)  # per-call technique internals


@dataclass
class InterleavedResult:
    """Raw samples per variant and the outputs of the first timed pass, per item."""

    samples: dict[str, dict[str, list]]  # variant -> column -> values, one value per timed call
    outputs: dict[str, list[Any]]  # variant -> output per item (first timed repeat)
    internals: dict[str, list[dict[str, Any]]]  # variant -> per-call internals, in call order


SAMPLE_COLUMNS = ("item", "repeat", "order", "latency_s", "ttft_s", "new_tokens", "peak_memory_bytes")


def run_interleaved(
    calls: Mapping[str, Callable[[int], CallOutput]],
    n_items: int,
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    track_memory: bool = True,
    before_call: Callable[[str, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> InterleavedResult:
    """Time every variant on every item, alternating variants call by call.

    Args:
        calls: variant name -> function of the item index returning a :class:`CallOutput`.
        n_items: items (batches) in the workload.
        repeats: timed passes over all items; warm-up passes come first and are not kept.
        device: where the calls run; CUDA is synchronised before each clock read.
        track_memory: measure peak memory per call (outside the timed region).
        before_call: called untimed before each call with (variant, item), e.g. to reseed.
        on_progress: called with the number of calls just finished (for a progress bar).

    Returns:
        An :class:`InterleavedResult` with one sample row per timed call.
    """
    names = list(calls)
    samples = {name: {col: [] for col in SAMPLE_COLUMNS} for name in names}
    outputs: dict[str, list[Any]] = {name: [None] * n_items for name in names}
    internals: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    memory = PeakMemory(device) if track_memory else None
    perf_counter = time.perf_counter
    order_counter = 0
    # 1. Warm-up passes: same calls, same alternation, nothing kept.
    for _ in range(warmup):
        for item in range(n_items):
            for name in names:
                if before_call is not None:
                    before_call(name, item)
                calls[name](item)
                if on_progress is not None:
                    on_progress(1)
    synchronize(device)
    # 2. Timed passes: the variant order flips every call (A B, B A, ...) so drift cancels.
    for repeat in range(repeats):
        for item in range(n_items):
            order = names if (repeat + item) % 2 == 0 else names[::-1]
            for name in order:
                if before_call is not None:
                    before_call(name, item)
                if memory is not None:
                    memory.start()
                synchronize(device)
                start = perf_counter()
                out = calls[name](item)
                synchronize(device)
                end = perf_counter()
                # 3. Bookkeeping happens after the clock stops.
                peak = memory.stop() if memory is not None else None
                column = samples[name]
                column["item"].append(item)
                column["repeat"].append(repeat)
                column["order"].append(order_counter)
                column["latency_s"].append(end - start)
                column["ttft_s"].append(
                    None if out.first_output_at is None else out.first_output_at - start
                )
                column["new_tokens"].append(out.new_tokens)
                column["peak_memory_bytes"].append(peak)
                internals[name].append(out.internals)
                if repeat == 0:
                    outputs[name][item] = out.output
                order_counter += 1
                if on_progress is not None:
                    on_progress(1)
    return InterleavedResult(samples=samples, outputs=outputs, internals=internals)


# ----------------------------------------------------------------------------------------------
# Statistics


def describe(values: Any) -> dict[str, float | int | None]:
    """Distribution of a sample: n, mean, std, CV%, min, median, p90, p99, max (NaN-free)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"n": 0, "mean": None, "std": None, "cv_percent": None, "min": None,
                "median": None, "p90": None, "p99": None, "max": None}
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {
        "n": int(arr.size),
        "mean": mean,
        "std": std,
        "cv_percent": 100.0 * std / mean if mean else None,
        "min": float(arr.min()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }


def verdict(ci_low: float | None, ci_high: float | None, margin_percent: float = MARGIN_PERCENT) -> str:
    """"faster" / "slower" only when the whole interval lies beyond the equivalence band
    [1 - m, 1 + m] (m = ``margin_percent`` / 100); otherwise "no practical difference".

    A difference smaller than the band is not worth acting on, however tight its interval: the
    baseline timed against itself must come out as "no practical difference" (``workbench calibrate``).

    Example:
        >>> verdict(1.001, 1.01), verdict(1.03, 1.08), verdict(0.90, 0.97), verdict(0.9, 1.5)
        ('no practical difference', 'faster', 'slower', 'no practical difference')
    """
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return NO_DIFFERENCE
    band = margin_percent / 100.0
    if ci_low > 1.0 + band:
        return "faster"
    if ci_high < 1.0 - band:
        return "slower"
    return NO_DIFFERENCE


def verdict_of(comparison: Mapping[str, Any] | None) -> str:
    """The verdict of a stored comparison under its own margin (the default for runs stored before
    margins existed, whose verdict said "faster" for any interval that excluded 1.0)."""
    comp = comparison or {}
    return verdict(comp.get("ci_low"), comp.get("ci_high"), comp.get("margin_percent", MARGIN_PERCENT))


def paired_speedup(
    baseline_s: Any,
    technique_s: Any,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    margin_percent: float = MARGIN_PERCENT,
    baseline_tokens: Any = None,
    technique_tokens: Any = None,
) -> dict[str, Any]:
    """Speedup of the technique over the baseline with a paired bootstrap interval.

    Without token counts the speedup is total baseline time over total technique time on the same
    calls (what the workload as a whole saves). With token counts (generation) it is time per output
    token: (baseline seconds / baseline tokens) / (technique seconds / technique tokens), so a variant
    that stops earlier (fewer tokens) is not credited with the time it did not spend; the total-time
    figure stays beside it (``total_time_speedup``). Pairs (same item, same repeat, run back to back)
    are resampled together, so item-to-item variation does not widen the interval.

    Beside it, ``median_pair_speedup`` (with ``median_pair_ci_low``/``_high``): the median of the
    per-pair ratios, what a typical call saves. A few calls that stall for seconds on a shared machine
    move the total ratio a lot and this one little, so when the two disagree the run was noisy.

    Returns:
        speedup, ci_low, ci_high, confidence, basis ("time per output token" or "total time"),
        significant (interval excludes 1.0), margin_percent and a verdict (see :func:`verdict`):
        "faster", "slower" or "no practical difference"; the total-time and median-of-pairs estimates.
    """
    base = np.asarray(baseline_s, dtype=float)
    tech = np.asarray(technique_s, dtype=float)
    if base.shape != tech.shape or base.size == 0:
        raise ValueError(f"paired samples differ in size: {base.size} baseline vs {tech.size} technique")
    per_token = baseline_tokens is not None and technique_tokens is not None
    if per_token:
        base_tok = np.asarray(baseline_tokens, dtype=float)
        tech_tok = np.asarray(technique_tokens, dtype=float)
        if base_tok.shape != base.shape or tech_tok.shape != tech.shape or (base_tok <= 0).any() \
                or (tech_tok <= 0).any():
            per_token = False  # a call without tokens: fall back to total time, said so by ``basis``
    if not per_token:
        base_tok = tech_tok = np.ones_like(base)

    def ratio(index: Any) -> Any:  # per-token time ratio over the selected pairs (index: (..., n))
        return (base[index].sum(axis=-1) / base_tok[index].sum(axis=-1)) / (
            tech[index].sum(axis=-1) / tech_tok[index].sum(axis=-1))

    everything = np.arange(base.size)
    speedup = float(ratio(everything))
    total_time = float(base.sum() / tech.sum())
    pair_ratios = (base / base_tok) / (tech / tech_tok)
    median_pair = float(np.median(pair_ratios))
    if base.size == 1:
        low = high = median_low = median_high = total_low = total_high = math.nan
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, base.size, size=(resamples, base.size))
        ratios = ratio(idx)
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(x) for x in np.quantile(ratios, [alpha, 1.0 - alpha]))
        totals = base[idx].sum(axis=1) / tech[idx].sum(axis=1)
        total_low, total_high = (float(x) for x in np.quantile(totals, [alpha, 1.0 - alpha]))
        medians = np.median(pair_ratios[idx], axis=1)
        median_low, median_high = (float(x) for x in np.quantile(medians, [alpha, 1.0 - alpha]))
    significant = bool(not math.isnan(low) and (low > 1.0 or high < 1.0))

    def none_if_nan(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {
        "speedup": speedup,
        "ci_low": none_if_nan(low),
        "ci_high": none_if_nan(high),
        "confidence": confidence,
        "basis": "time per output token" if per_token else "total time",
        "significant": significant,
        "margin_percent": float(margin_percent),
        "verdict": verdict(low, high, margin_percent),
        "pairs": int(base.size),
        "total_time_speedup": total_time,
        "total_time_ci_low": none_if_nan(total_low),
        "total_time_ci_high": none_if_nan(total_high),
        "tokens_baseline": int(base_tok.sum()) if per_token else None,
        "tokens_technique": int(tech_tok.sum()) if per_token else None,
        "median_pair_speedup": median_pair,
        "median_pair_ci_low": none_if_nan(median_low),
        "median_pair_ci_high": none_if_nan(median_high),
    }


def _variant_summary(columns: Mapping[str, list]) -> dict[str, Any]:
    latency = np.asarray(columns["latency_s"], dtype=float)
    summary: dict[str, Any] = {"calls": int(latency.size), "latency_s": describe(latency)}
    tokens = [t for t in columns.get("new_tokens", []) if t is not None]
    if tokens and len(tokens) == latency.size:
        tokens_arr = np.asarray(tokens, dtype=float)
        ttft = np.asarray([np.nan if v is None else v for v in columns["ttft_s"]], dtype=float)
        # Time per output token: the decode phase (after the first token) over the tokens it made.
        decode_tokens = tokens_arr - 1
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = np.where(decode_tokens > 0, (latency - ttft) / decode_tokens, np.nan)
        summary["ttft_s"] = describe(v for v in ttft if not math.isnan(v))
        summary["tpot_s"] = describe(v for v in tpot if not math.isnan(v))
        summary["new_tokens_total"] = int(tokens_arr.sum())
        summary["tokens_per_s"] = float(tokens_arr.sum() / latency.sum()) if latency.sum() else None
        summary["tokens_per_s_per_call"] = describe(tokens_arr / latency)
    peaks = [p for p in columns.get("peak_memory_bytes", []) if p is not None]
    summary["peak_memory_bytes"] = int(max(peaks)) if peaks else None
    return summary


def summarize_samples(
    samples: Mapping[str, Mapping[str, list]], baseline: str = BASELINE, seed: int = 0,
    margin_percent: float = MARGIN_PERCENT,
) -> dict[str, Any]:
    """Statistics of every variant and the comparison of each non-baseline variant to the baseline.

    A pure function of the raw samples, the bootstrap seed and the margin: recomputing it from stored
    samples gives the stored summary back. Where both variants counted output tokens on every call
    (generation) the speedup is per output token (see :func:`paired_speedup`).
    """
    variants = {name: _variant_summary(cols) for name, cols in samples.items()}
    result: dict[str, Any] = {"variants": variants}
    others = [name for name in samples if name != baseline]
    if baseline in samples and others:
        base = samples[baseline]
        base_by_call = {key: (latency, tokens) for key, latency, tokens in
                        zip(zip(base["item"], base["repeat"]), base["latency_s"], _tokens(base))}
        comparisons = {}
        for name in others:
            tech = samples[name]
            pairs = [(*base_by_call[key], latency, tokens) for key, latency, tokens in
                     zip(zip(tech["item"], tech["repeat"]), tech["latency_s"], _tokens(tech)) if key in base_by_call]
            counted = all(p[1] is not None and p[3] is not None for p in pairs)
            comparisons[name] = paired_speedup(
                [p[0] for p in pairs], [p[2] for p in pairs], seed=seed, margin_percent=margin_percent,
                baseline_tokens=[p[1] for p in pairs] if counted else None,
                technique_tokens=[p[3] for p in pairs] if counted else None)
        result["comparisons"] = comparisons
        result["comparison"] = comparisons[others[0]]
    return result


def _tokens(columns: Mapping[str, list]) -> list:
    """Output tokens per call, or None per call where the variant does not count tokens."""
    tokens = list(columns.get("new_tokens") or [])
    return tokens if len(tokens) == len(columns["latency_s"]) else [None] * len(columns["latency_s"])
