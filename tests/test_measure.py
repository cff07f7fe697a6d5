import time

import numpy as np
import pytest

from workbench.measure import (
    CallOutput,
    PeakMemory,
    describe,
    paired_speedup,
    run_interleaved,
    summarize_samples,
    verdict,
    verdict_of,
)


def test_describe_distribution():
    stats = describe([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["n"] == 5
    assert stats["median"] == 3.0
    assert stats["p90"] == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert stats["max"] == 100.0
    assert describe([])["median"] is None


def test_speedup_interval_detects_a_real_difference():
    rng = np.random.default_rng(1)
    base = 0.010 + rng.normal(0, 0.0003, 40)
    tech = 0.005 + rng.normal(0, 0.0003, 40)
    comp = paired_speedup(base, tech)
    assert comp["ci_low"] < comp["speedup"] < comp["ci_high"]
    assert comp["ci_low"] > 1.5 and comp["verdict"] == "faster" and comp["significant"]
    slower = paired_speedup(tech, base)
    assert slower["verdict"] == "slower" and slower["ci_high"] < 1.0


def test_no_practical_difference_when_interval_contains_one():
    rng = np.random.default_rng(2)
    base = 0.010 + rng.normal(0, 0.001, 30)
    tech = 0.010 + rng.normal(0, 0.001, 30)
    comp = paired_speedup(base, tech)
    assert comp["ci_low"] <= 1.0 <= comp["ci_high"]
    assert comp["verdict"] == "no practical difference" and not comp["significant"]


def test_a_tiny_but_certain_difference_is_no_practical_difference():
    # The same calls, the technique 0.5% faster on every one: the interval excludes 1.0 (significant) but
    # stays inside the +-2% band, so the verdict is not "faster" (the A/A failure the band exists for).
    rng = np.random.default_rng(4)
    base = 0.010 + rng.normal(0, 0.0002, 60)
    tech = base / 1.005
    comp = paired_speedup(base, tech)
    assert comp["significant"] and comp["ci_low"] > 1.0
    assert comp["verdict"] == "no practical difference"
    assert paired_speedup(base, base / 1.10)["verdict"] == "faster"
    assert paired_speedup(base, base * 1.10)["verdict"] == "slower"
    # the band is settable: at 0.1% the same 0.5% is a difference
    assert paired_speedup(base, tech, margin_percent=0.1)["verdict"] == "faster"


def test_verdict_needs_the_whole_interval_beyond_the_band():
    assert verdict(1.021, 1.5) == "faster" and verdict(0.5, 0.979) == "slower"
    assert verdict(1.01, 1.5) == "no practical difference"  # overlaps the band
    assert verdict(None, None) == "no practical difference"
    stored_before_margins = {"speedup": 1.004, "ci_low": 1.001, "ci_high": 1.008, "verdict": "faster"}
    assert verdict_of(stored_before_margins) == "no practical difference"


def test_aa_samples_come_out_no_practical_difference():
    # Synthetic A/A: both variants draw from one latency distribution (with a few stalls), 200 times.
    rng = np.random.default_rng(5)
    verdicts = []
    for _ in range(200):
        calls = 0.010 * rng.lognormal(0, 0.05, (2, 40))
        calls[:, rng.integers(0, 40, 2)] *= 3
        verdicts.append(paired_speedup(calls[0], calls[1], seed=1)["verdict"])
    assert verdicts.count("no practical difference") / len(verdicts) >= 0.95


def test_generation_speedup_is_per_output_token_when_lengths_differ():
    # The technique stops early on some calls (fewer tokens): per token it is 1.25x faster, while
    # total time credits it with the work it did not do (about 2x).
    base_s = np.full(20, 1.0)
    base_tokens = np.full(20, 100)
    tech_tokens = np.where(np.arange(20) % 2 == 0, 100, 60)
    tech_s = tech_tokens * 0.008
    comp = paired_speedup(base_s, tech_s, baseline_tokens=base_tokens, technique_tokens=tech_tokens)
    assert comp["basis"] == "time per output token"
    assert comp["speedup"] == pytest.approx(1.25)
    assert comp["total_time_speedup"] == pytest.approx(20 / tech_s.sum())
    assert comp["total_time_speedup"] > 1.5 > comp["speedup"]
    assert comp["tokens_baseline"] == 2000 and comp["tokens_technique"] == 1600
    # equal lengths: the two figures agree
    same = paired_speedup(base_s, base_s / 1.25, baseline_tokens=base_tokens, technique_tokens=base_tokens)
    assert same["speedup"] == pytest.approx(same["total_time_speedup"])


def test_summary_uses_per_token_speedup_for_generation_samples():
    def columns(latency, tokens):
        n = len(latency)
        return {"item": list(range(n)), "repeat": [0] * n, "order": list(range(n)), "latency_s": latency,
                "ttft_s": [0.01] * n, "new_tokens": tokens, "peak_memory_bytes": [None] * n}

    samples = {"baseline": columns([1.0] * 6, [50] * 6), "quantization": columns([0.5] * 6, [25] * 6)}
    comp = summarize_samples(samples)["comparison"]
    assert comp["total_time_speedup"] == pytest.approx(2.0) and comp["speedup"] == pytest.approx(1.0)
    assert comp["verdict"] == "no practical difference"
    classifier = {name: {**cols, "new_tokens": [None] * 6} for name, cols in samples.items()}
    assert summarize_samples(classifier)["comparison"]["basis"] == "total time"


def test_median_of_pairs_is_not_moved_by_a_few_stalls():
    # 40 pairs where the technique halves every call, then 3 baseline calls stall for 20x their time
    # (what an oversubscribed machine does): the total-time ratio jumps, the median call does not.
    rng = np.random.default_rng(3)
    tech = 0.005 + rng.normal(0, 0.0002, 40)
    base = 2 * tech
    quiet = paired_speedup(base, tech)
    assert quiet["median_pair_speedup"] == pytest.approx(2.0) and quiet["speedup"] == pytest.approx(2.0)
    assert quiet["median_pair_ci_low"] <= 2.0 <= quiet["median_pair_ci_high"]
    stalled = base.copy()
    stalled[[3, 17, 29]] *= 20
    noisy = paired_speedup(stalled, tech)
    assert noisy["speedup"] > 3.0  # the total-time ratio is dragged up by three calls
    assert noisy["median_pair_speedup"] == pytest.approx(2.0, rel=0.01)
    assert noisy["median_pair_ci_high"] < noisy["ci_high"]


def test_single_pair_has_no_interval():
    comp = paired_speedup([1.0], [0.5])
    assert comp["speedup"] == 2.0 and comp["ci_low"] is None and comp["verdict"] == "no practical difference"


def test_interleaving_alternates_order_and_skips_warmup():
    log = []

    def make(name):
        def call(item):
            log.append((name, item))
            return CallOutput(output=f"{name}-{item}", new_tokens=3, first_output_at=time.perf_counter())
        return call

    result = run_interleaved({"a": make("a"), "b": make("b")}, n_items=2, repeats=3, warmup=1)
    # warm-up: 2 items x 2 variants, then 3 repeats x 2 items x 2 variants
    assert len(log) == 4 + 12
    assert len(result.samples["a"]["latency_s"]) == 6
    timed = log[4:]
    firsts = [timed[i][0] for i in range(0, len(timed), 2)]
    assert firsts == ["a", "b", "b", "a", "a", "b"]  # order flips call by call
    assert result.outputs["a"] == ["a-0", "a-1"]
    assert all(t is not None and t >= 0 for t in result.samples["b"]["ttft_s"])


def test_summary_is_a_pure_function_of_samples():
    def slow(item):
        time.sleep(0.002)
        return CallOutput(None, new_tokens=4, first_output_at=time.perf_counter())

    def fast(item):
        return CallOutput(None, new_tokens=4, first_output_at=time.perf_counter())

    result = run_interleaved({"baseline": slow, "fast": fast}, n_items=3, repeats=4, warmup=0)
    first = summarize_samples(result.samples)
    again = summarize_samples({k: {c: list(v) for c, v in cols.items()} for k, cols in result.samples.items()})
    assert first == again
    assert first["comparison"]["speedup"] > 1.0
    variant = first["variants"]["fast"]
    assert variant["new_tokens_total"] == 3 * 4 * 4
    assert variant["tokens_per_s"] == pytest.approx(48 / sum(result.samples["fast"]["latency_s"]))
    assert variant["tpot_s"]["n"] == 12


def test_peak_memory_sees_an_allocation():
    import gc

    tracker = PeakMemory("cpu")
    if not tracker.cpu_supported:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    gc.collect()  # an earlier test's garbage freed during the call would hide the allocation (seen under xdist)
    tracker.start()
    block = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, touched
    block[::512] = 2.0
    peak = tracker.stop()
    del block
    assert peak is not None and peak >= 192 * 1024 * 1024
