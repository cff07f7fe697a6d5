"""Which layers to keep in float: a per-layer sensitivity scan and a greedy search inside a budget.

Quantizing every linear layer of a real LM at once can cost far more than the sum of its parts (int8
dynamic on SmolLM2-135M: +393% perplexity on calibration text, while the per-layer changes add up to
much less), and a few layers carry most of it (SwiGLU ``down_proj`` inputs have activation outliers
that a per-tensor int8 scale crushes). The search, all on calibration text that is never timed:

1. **Scan**: quantize one group at a time, everything else float, and record the perplexity change.
   A group is one linear layer (one decoder layer's q/k/v/o/gate/up/down, or the LM head): the finest
   grouping, so only the layers that matter stay float. On SmolLM2-135M that is 211 groups, one
   teacher-forced pass over the calibration text each (a few minutes on 2 cores); grouping by kind
   across layers would be 8 passes but keeps all 30 ``down_proj`` float when a handful carry the loss.
2. **Greedy**: everything quantized, then keep the most sensitive group in float, then the next ...,
   until the whole model's perplexity change is within the budget (the step found by doubling and
   bisection over the number kept float, see :func:`greedy_keep_float`).
3. **Curve**: a few of those steps (none kept float, the chosen one and points between) timed side by
   side with the float model, interleaved (see :func:`time_curve`), so the speed each float layer costs
   is measured, not assumed.

Layers switch between float and quantized inside one working copy (:class:`MixedPrecision`), so a
configuration costs a few ``setattr`` calls, not a new copy of the model.

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)).eval()
    >>> found = search_keep_float(model, "int8-dynamic", torch.randint(0, 64, (200,)), window=64,
    ...                           max_perplexity_change_percent=100.0)
    >>> found["groups"], found["keep_float"]
    (9, [])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from workbench.measure import CallOutput, run_interleaved, summarize_samples
from workbench.techniques._quantize import conv1d_to_linear, quantize_copy

FLOAT = "float"  # the reference variant's name in the timed curve


class MixedPrecision:
    """One working copy of a model whose linear layers switch between float and quantized in place.

    Holds the float copy (GPT-2's Conv1D converted to nn.Linear) and one fully quantized copy's layers;
    :meth:`use` puts each layer's float or quantized module in place. The given model is never changed.
    """

    def __init__(self, model: nn.Module, scheme: str) -> None:
        self.model = copy.deepcopy(model).eval()
        conv1d_to_linear(self.model)
        quantized, self.report = quantize_copy(model, scheme)
        self.names = [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        quantized_modules = dict(quantized.named_modules())
        self._float = {name: self.model.get_submodule(name) for name in self.names}
        self._quantized = {name: quantized_modules[name] for name in self.names}

    def use(self, keep_float: Collection[str]) -> nn.Module:
        """The working copy with ``keep_float`` layers in float and every other one quantized."""
        keep = set(keep_float)
        for name in self.names:
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child,
                    self._float[name] if name in keep else self._quantized[name])
        return self.model


class PerplexityChange:
    """Perplexity change (%) of a model against ``reference`` on fixed token ids (N,), teacher-forced in
    windows of ``window`` tokens as :func:`workbench.quality.lm_text_quality` scores them; the reference
    is scored once."""

    def __init__(self, reference: nn.Module, ids: torch.Tensor, window: int) -> None:
        self.chunks = [ids[start:start + window].unsqueeze(0) for start in range(0, max(len(ids) - 1, 1), window)
                       if len(ids[start:start + window]) >= 2]
        if not self.chunks:
            raise ValueError("the sensitivity scan needs at least 2 tokens of calibration text")
        self.tokens = sum(chunk.shape[1] - 1 for chunk in self.chunks)
        self.reference_nll = self._nll(reference)

    def _nll(self, model: nn.Module) -> float:
        total = 0.0
        with torch.inference_mode():
            for chunk in self.chunks:
                logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].float(), dim=-1)  # (T-1, V)
                total -= float(logp.gather(1, chunk[0, 1:, None]).sum())
        return total

    def __call__(self, model: nn.Module) -> float:
        return 100.0 * (math.exp((self._nll(model) - self.reference_nll) / self.tokens) - 1.0)


def scan(mixed: MixedPrecision, score: Callable[[nn.Module], float]) -> dict[str, float]:
    """Perplexity change (%) with one group quantized and every other one float, per group."""
    everything = set(mixed.names)
    return {name: score(mixed.use(everything - {name})) for name in mixed.names}


def greedy_keep_float(mixed: MixedPrecision, score: Callable[[nn.Module], float], sensitivity: Mapping[str, float],
                      max_perplexity_change_percent: float) -> tuple[list[dict[str, Any]], int]:
    """The fewest most-sensitive groups to keep float for the budget, and the steps measured on the way.

    Step k keeps the k most sensitive groups float. Keeping more float only brings the model closer to
    float, so the change is taken as falling with k: steps 0, 1, 2, 4 ... until one is within the budget,
    then bisection between the last one over it and that one (about 2 log2(groups) whole-model passes
    instead of one per group; keeping everything float, 0% by definition, ends it at the latest).
    Returns the measured steps in order of k and the chosen k.
    """
    order = sorted(sensitivity, key=lambda name: -sensitivity[name])
    n = len(order)
    measured: dict[int, float] = {}

    def change(k: int) -> float:
        if k not in measured:  # all float is the reference itself
            measured[k] = score(mixed.use(order[:k])) if k < n else 0.0
        return measured[k]

    # 1. Doubling until within the budget: `over` is the largest k known over it, `within` the smallest within.
    over, within = -1, 0
    while change(within) > max_perplexity_change_percent:
        over, within = within, min(max(2 * within, 1), n)
    # 2. Bisection between them.
    while within - over > 1:
        middle = (over + within) // 2
        if change(middle) > max_perplexity_change_percent:
            over = middle
        else:
            within = middle
    steps = [{"kept_float": k, "added": order[k - 1] if k else None, "perplexity_change_percent": measured[k]}
             for k in sorted(measured)]
    return steps, within


def search_keep_float(model: nn.Module, scheme: str, ids: torch.Tensor, window: int,
                      max_perplexity_change_percent: float, mixed: MixedPrecision | None = None) -> dict[str, Any]:
    """Scan and greedy search on calibration token ids (N,): which layers to keep float for the budget.

    Returns groups, per_group_perplexity_change_percent (the scan), steps (the greedy steps measured),
    keep_float (layer names, most sensitive first), perplexity_change_percent (the whole model with
    them float), calibration_tokens and the seconds each phase took.
    """
    # 1. The working copy and the scorer (the float model scored once).
    mixed = mixed or MixedPrecision(model, scheme)
    score = PerplexityChange(mixed.use(mixed.names), ids, window)
    # 2. One group at a time.
    started = time.perf_counter()
    sensitivity = scan(mixed, score)
    scanned = time.perf_counter()
    # 3. Most sensitive first, until the whole model is within the budget.
    steps, chosen = greedy_keep_float(mixed, score, sensitivity, max_perplexity_change_percent)
    order = sorted(sensitivity, key=lambda name: -sensitivity[name])
    return {
        "groups": len(mixed.names),
        "grouping": "one group per linear layer (each decoder layer's projections by kind, and the LM head)",
        "per_group_perplexity_change_percent": sensitivity,
        "steps": steps,
        "keep_float": order[:chosen],
        "perplexity_change_percent": next(s["perplexity_change_percent"] for s in steps if s["kept_float"] == chosen),
        "max_perplexity_change_percent": max_perplexity_change_percent,
        "calibration_tokens": score.tokens,
        "scan_seconds": scanned - started,
        "greedy_seconds": time.perf_counter() - scanned,
    }


def curve_steps(kept_float: int, points: int) -> list[int]:
    """Which greedy steps to time: none kept float, the chosen step, and doublings between, at most
    ``points`` in all (evenly thinned).

    Example:
        >>> curve_steps(20, 5), curve_steps(20, 3), curve_steps(0, 5)
        ([0, 1, 4, 16, 20], [0, 4, 20], [0])
    """
    between = [2 ** j for j in range(kept_float.bit_length()) if 0 < 2 ** j < kept_float]
    if len(between) > points - 2:
        keep = max(points - 2, 0)  # evenly spread: the middle of each of `keep` equal stretches
        between = [between[round((i + 0.5) * len(between) / keep - 0.5)] for i in range(keep)]
    return sorted({0, *between, kept_float})


def time_curve(mixed: MixedPrecision, float_model: nn.Module, found: Mapping[str, Any], steps: list[int],
               run: Callable[[nn.Module, int], CallOutput], n_items: int, repeats: int, device: str,
               seed: int) -> list[dict[str, Any]]:
    """Each chosen greedy step and the float model timed side by side, call by call (the working copy is
    switched untimed before each call); per-output-token speedup against float with its interval.

    ``run(model, item)`` runs one calibration item; ``found`` is :func:`search_keep_float`'s result.
    """
    order = sorted(found["per_group_perplexity_change_percent"],
                   key=lambda name: -found["per_group_perplexity_change_percent"][name])
    change = {s["kept_float"]: s["perplexity_change_percent"] for s in found["steps"]}
    keeps = {f"kept_float={k}": order[:k] for k in steps}
    calls: dict[str, Callable[[int], CallOutput]] = {FLOAT: lambda i: run(float_model, i)}
    for name in keeps:
        calls[name] = lambda i: run(mixed.model, i)
    measured = run_interleaved(calls, n_items, repeats, warmup=1, device=device, track_memory=False,
                               before_call=lambda name, i: mixed.use(keeps[name]) if name in keeps else None)
    comparisons = summarize_samples(measured.samples, baseline=FLOAT, seed=seed)["comparisons"]
    float_median_s = float(torch.tensor(measured.samples[FLOAT]["latency_s"]).median())
    return [{"kept_float": k, "quantized_layers": len(mixed.names) - k,
             "perplexity_change_percent": change[k],
             "median_latency_s": float(torch.tensor(measured.samples[name]["latency_s"]).median()),
             "median_latency_float_s": float_median_s,
             "speedup_vs_float": comparisons[name]["speedup"],
             "speedup_ci_low": comparisons[name]["ci_low"], "speedup_ci_high": comparisons[name]["ci_high"],
             "speedup_basis": comparisons[name].get("basis")}
            for k, name in zip(steps, keeps)]


def operating_point(curve: list[dict[str, Any]], max_perplexity_change_percent: float,
                    layers: int) -> dict[str, Any]:
    """The fastest timed point within the budget (calibration perplexity), flagged when its interval
    does not show it faster than float."""
    allowed = [p for p in curve if p["perplexity_change_percent"] <= max_perplexity_change_percent]
    chosen = dict(max(allowed, key=lambda p: p["speedup_vs_float"]))
    low = chosen["speedup_ci_low"]
    chosen["faster_than_float"] = low is not None and low > 1.0
    if chosen["kept_float"] == layers:
        chosen["fallback"] = (f"no configuration with a quantized layer stayed within "
                              f"{max_perplexity_change_percent}% perplexity change: every layer kept float")
    return chosen
