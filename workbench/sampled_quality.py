"""Quality of a sampling technique: are its samples distributed like the baseline's?

When a technique samples, token identity says nothing: two correct samplers agree on a token only by
chance. What a lossless sampler (speculative sampling, Leviathan et al. 2023) promises is the
*distribution* of its outputs. So, after the timed calls (where both variants sample with the same
settings and seeds), both variants draw ``samples_per_prompt`` more samples for every prompt, untimed,
each from its own seed stream so the two sets are independent, and two statistics compare them:

1. Score (primary): each sample's mean log-probability per token under the target at the sampling
   temperature (teacher-forced). A sampler that is too greedy scores higher than the target's own
   samples, one that drifts toward a draft model scores lower. The difference of mean scores is
   tested by a permutation test stratified by prompt (the 2S labels of each prompt are shuffled among
   its own samples, so prompts that are easier than others add no noise).
2. Unigram (secondary): the total-variation distance between the two sets' token frequencies, with a
   p-value from the same stratified permutations; it catches biases the score misses.

Any fixed function of a sample gives a valid test; these two are chosen for their power. The check
passes when the family p-value (Bonferroni over the two tests) is at least ``alpha``. Passing means
"no difference that this many samples can detect", so the sample count and the effect size
(``score_difference_nats_per_token``) are reported with it.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(-2.0, 0.3, size=(6, 8))  # (prompts, samples) scores
    >>> score_test(base, rng.normal(-2.0, 0.3, size=(6, 8)))[1] > 0.01  # same distribution
    True
    >>> score_test(base, rng.normal(-1.7, 0.3, size=(6, 8)))[1] < 0.01  # a greedier sampler
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.measure import CallOutput
    from workbench.techniques.base import Metric
    from workbench.models.loading import LoadedModel
    from workbench.workloads import Batch

SCORE_TEST = ("stratified permutation test of the mean log-probability per token under the target at the "
              "sampling temperature")

Samples = list[list[list[int]]]  # [prompt][sample] -> new token ids


@dataclass(frozen=True)
class SampledCheck:
    """Settings of the distributional comparison of two samplers.

    Example:
        >>> SampledCheck(samples_per_prompt=16).alpha
        0.01
    """

    samples_per_prompt: int = 8  # samples per prompt and variant, each with its own seed: more power, and
    # samples_per_prompt x prompts extra generations per variant (untimed)
    alpha: float = 0.01  # family-wise significance level over both tests: lower, fewer false alarms, less power
    permutations: int = 2000  # permutation resamples; the smallest p-value is 1 / (permutations + 1)
    permutation_seed: int = 0  # the permutation test's own generator (not torch's)

    def __post_init__(self) -> None:
        if isinstance(self.samples_per_prompt, bool) or not isinstance(self.samples_per_prompt, int) \
                or self.samples_per_prompt < 2:
            raise WorkbenchError(f"samples_per_prompt={self.samples_per_prompt!r} is invalid: use an integer >= 2 "
                                 "(8 or more gives the test power)")
        if not 0.0 < self.alpha < 1.0:
            raise WorkbenchError(f"alpha={self.alpha!r} is invalid: use a level between 0 and 1, e.g. 0.01")
        if isinstance(self.permutations, bool) or not isinstance(self.permutations, int) \
                or self.permutations < 2 / self.alpha:
            raise WorkbenchError(f"permutations={self.permutations!r} is too few for alpha={self.alpha}: use at "
                                 f"least {int(np.ceil(2 / self.alpha))} so a p-value below alpha/2 can occur")


@dataclass(frozen=True)
class SampledComparison:
    """The distributional comparison of a technique's samples with the baseline's (plain data)."""

    inputs: int  # prompts compared
    samples_per_prompt: int  # samples per prompt and variant
    sampling: dict[str, Any]  # the generate settings both variants sampled with
    score_baseline_nats_per_token: float  # mean over samples of the mean log p per token (target, temperature)
    score_technique_nats_per_token: float
    score_difference_nats_per_token: float  # technique - baseline; 0 for the same distribution
    score_p_value: float  # two-sided, stratified permutation test of that difference
    unigram_tv_distance: float  # total variation between the token frequencies of the two sets, in [0, 1]
    unigram_p_value: float  # the same permutations, statistic: that distance
    p_value: float  # family p-value: Bonferroni over both tests, min(1, 2 min(p_score, p_unigram))
    alpha: float  # level the check is judged at
    passed: bool  # p_value >= alpha: no difference detected with these samples
    permutations: int
    test: str = SCORE_TEST  # what the primary test is, in words

    def to_dict(self) -> dict[str, Any]:
        """The standard-quality keys a sampled run stores (``comparison`` says which kind it is)."""
        return {"comparison": "distributional (sampled)", **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------------------------------
# drawing and scoring
# ----------------------------------------------------------------------------------------------------


def sample_seed(seed: int, stream: int, item: int, sample: int) -> int:
    """The torch seed of one sample: a well-mixed function of the run's seed, the variant's stream, the
    input and the sample (numpy's SeedSequence), so no two draws share random numbers.

    Example:
        >>> sample_seed(0, 0, 0, 0) == sample_seed(0, 0, 0, 0) != sample_seed(0, 1, 0, 0)
        True
    """
    return int(np.random.SeedSequence([seed, stream, item, sample]).generate_state(1)[0])


def draw_samples(run: Callable[[Batch], CallOutput], batches: Sequence[Batch], samples_per_prompt: int,
                 seed: int = 0, stream: int = 0) -> Samples:
    """``samples_per_prompt`` outputs of ``run`` for every input; torch is seeded before each call
    (:func:`sample_seed`).

    Returns ``samples[prompt][sample]``: the new token ids, one prompt per input of every batch in order.
    """
    samples: Samples = [[] for batch in batches for _ in range(batch.size)]
    for sample in range(samples_per_prompt):
        offset = 0
        for item, batch in enumerate(batches):
            torch.manual_seed(sample_seed(seed, stream, item, sample))
            rows = run(batch).output
            for row in rows:
                samples[offset].append([int(t) for t in row])
                offset += 1
    return samples


def prompt_ids(batches: Sequence[Batch]) -> list[torch.Tensor]:
    """Every input's prompt ids (1, T), left padding removed."""
    prompts = []
    for batch in batches:
        ids, mask = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
        for row in range(ids.shape[0]):
            keep = ids[row] if mask is None else ids[row][mask[row].bool()]
            prompts.append(keep.view(1, -1))
    return prompts


def score_samples(model: Any, prompts: Sequence[torch.Tensor], samples: Samples, temperature: float) -> np.ndarray:
    """Mean log-probability per token of every sample under ``model`` at ``temperature``: (prompts, samples).

    Teacher-forced, one forward pass per prompt over all its samples (right-padded; causal attention
    keeps the padding out of every real position). An end-of-sequence token counts like any other.
    """
    scores = np.zeros((len(prompts), len(samples[0]) if samples else 0))
    with torch.inference_mode():
        for p, (prompt, rows) in enumerate(zip(prompts, samples)):
            lengths = torch.tensor([len(r) for r in rows])
            if int(lengths.min()) < 1:
                raise ValueError(f"prompt {p} has an empty sample: nothing to score")
            width, start = int(lengths.max()), prompt.shape[1]
            new = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=prompt.device)  # (S, L)
            ids = torch.cat([prompt.expand(len(rows), -1), new], dim=1)  # (S, T + L)
            logits = model(input_ids=ids).logits[:, start - 1:start - 1 + width].float()  # (S, L, V)
            logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, new[..., None])[..., 0]  # (S, L)
            mask = (torch.arange(width)[None, :] < lengths[:, None]).to(logp)
            scores[p] = ((logp * mask).sum(dim=1) / lengths.to(logp)).cpu().numpy()
    return scores


# ----------------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------------


def _labels(prompts: int, per_side: int, permutations: int, seed: int) -> np.ndarray:
    """(R, P, 2S) 0/1 labels, 1 = technique: each prompt's 2S labels shuffled among its own samples."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.repeat([0.0, 1.0], per_side), (permutations, prompts, 1))
    return rng.permuted(base, axis=2)


def _p_value(observed: float, null: np.ndarray) -> float:
    """Share of the permutations at least as extreme, counting the observed labelling itself."""
    return float((1 + np.sum(null >= observed - 1e-12)) / (len(null) + 1))


def score_test(baseline: np.ndarray, technique: np.ndarray, permutations: int = 2000,
               seed: int = 0) -> tuple[float, float]:
    """Difference of mean scores (technique - baseline) and its two-sided stratified permutation p-value.

    ``baseline`` and ``technique`` are (prompts, samples) arrays of per-sample scores.
    """
    baseline, technique = np.asarray(baseline, float), np.asarray(technique, float)
    if baseline.shape != technique.shape or baseline.ndim != 2:
        raise ValueError(f"scores must be two (prompts, samples) arrays of one shape, got {baseline.shape} "
                         f"and {technique.shape}")
    prompts, per_side = baseline.shape
    pooled = np.concatenate([baseline, technique], axis=1)  # (P, 2S)
    observed = float(technique.mean() - baseline.mean())
    labels = _labels(prompts, per_side, permutations, seed)  # (R, P, 2S)
    n = prompts * per_side
    null = ((labels * pooled).sum(axis=(1, 2)) - ((1 - labels) * pooled).sum(axis=(1, 2))) / n
    return observed, _p_value(abs(observed), np.abs(null))


def unigram_test(baseline: Samples, technique: Samples, permutations: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Total-variation distance of the two sets' token frequencies and its stratified permutation p-value.

    Example:
        >>> a = [[[1, 2], [1, 3]], [[2, 2], [3, 1]]]
        >>> unigram_test(a, a, permutations=200)[0]
        0.0
    """
    prompts, per_side = len(baseline), len(baseline[0])
    rows = [row for b, t in zip(baseline, technique) for row in (*b, *t)]  # prompt-major, base then technique
    vocab = sorted({token for row in rows for token in row})
    column = {token: j for j, token in enumerate(vocab)}
    counts = np.zeros((len(rows), len(vocab)))  # (P * 2S, V') token counts per sample
    for i, row in enumerate(rows):
        for token in row:
            counts[i, column[token]] += 1

    def distance(labels: np.ndarray) -> np.ndarray:  # labels (R, P * 2S) -> (R,)
        tech, base = labels @ counts, (1 - labels) @ counts
        return 0.5 * np.abs(tech / tech.sum(1, keepdims=True) - base / base.sum(1, keepdims=True)).sum(axis=1)

    observed_labels = np.tile(np.repeat([0.0, 1.0], per_side), prompts)[None, :]
    observed = float(distance(observed_labels)[0])
    null = distance(_labels(prompts, per_side, permutations, seed).reshape(permutations, -1))
    return observed, _p_value(observed, null)


def compare_samples(scores_baseline: np.ndarray, scores_technique: np.ndarray, samples_baseline: Samples,
                    samples_technique: Samples, sampling: dict[str, Any],
                    check: SampledCheck = SampledCheck()) -> SampledComparison:
    """Both tests on two sets of samples already drawn and scored (see the module docstring)."""
    difference, p_score = score_test(scores_baseline, scores_technique, check.permutations, check.permutation_seed)
    tv, p_unigram = unigram_test(samples_baseline, samples_technique, check.permutations, check.permutation_seed + 1)
    family = min(1.0, 2.0 * min(p_score, p_unigram))
    return SampledComparison(
        inputs=len(samples_baseline), samples_per_prompt=len(samples_baseline[0]), sampling=dict(sampling),
        score_baseline_nats_per_token=float(np.mean(scores_baseline)),
        score_technique_nats_per_token=float(np.mean(scores_technique)),
        score_difference_nats_per_token=difference, score_p_value=p_score, unigram_tv_distance=tv,
        unigram_p_value=p_unigram, p_value=family, alpha=check.alpha, passed=family >= check.alpha,
        permutations=check.permutations)


def compare_variants(target: LoadedModel, batches: Sequence[Batch], baseline: Callable[[Batch], CallOutput],
                     technique: Callable[[Batch], CallOutput], sampling: dict[str, Any], seed: int = 0,
                     check: SampledCheck = SampledCheck()) -> SampledComparison:
    """Draw ``check.samples_per_prompt`` samples per input from both variants (same seeds), score them
    under the target at the sampling temperature, and compare the two sets. Untimed.

    Example:
        >>> comparison = compare_variants(trial.model, trial.batches, baseline.run, technique.run,
        ...                               technique.sampling(), seed=spec.seed)  # doctest: +SKIP
        >>> comparison.passed, comparison.p_value  # doctest: +SKIP
        (True, 0.62)
    """
    # 1. Samples: one seed stream per variant, so the two sets are independent, as a two-sample test
    #    assumes (shared seeds couple samplers that use random numbers alike and hide their difference).
    drawn = {name: draw_samples(run, batches, check.samples_per_prompt, seed, stream)
             for stream, (name, run) in enumerate((("baseline", baseline), ("technique", technique)))}
    # 2. Scores under the target, at the temperature both sampled with.
    prompts = prompt_ids(batches)
    temperature = float(sampling.get("temperature") or 1.0)
    scores = {name: score_samples(target.model, prompts, samples, temperature) for name, samples in drawn.items()}
    # 3. The two tests.
    return compare_samples(scores["baseline"], scores["technique"], drawn["baseline"], drawn["technique"],
                           sampling, check)


def metrics(standard_quality: dict[str, Any]) -> list[Metric]:
    """A sampled run's distributional figures as typed metrics (none for a greedy run's comparison).

    Example:
        >>> [m.name for m in metrics({"token_agreement": 1.0})]
        []
    """
    from workbench.techniques.base import Metric  # here: the techniques import this module

    if standard_quality.get("comparison") != "distributional (sampled)":
        return []
    q = standard_quality
    return [
        Metric("sampled_distribution_p_value", q["p_value"], "", higher_is_better=True,
               label=f"same distribution as the sampled baseline ({'passed' if q['passed'] else 'FAILED'} at "
                     f"alpha={q['alpha']:g}, {q['inputs']} inputs x {q['samples_per_prompt']} samples), p"),
        Metric("sampled_score_change_nats", q["score_difference_nats_per_token"], "nats", higher_is_better=None,
               label="log p per token vs baseline"),
        Metric("sampled_score_p_value", q["score_p_value"], "", higher_is_better=True, headline=False,
               label="score test p"),
        Metric("sampled_unigram_tv_distance", q["unigram_tv_distance"], "", higher_is_better=False, headline=False,
               label="unigram TV distance"),
        Metric("sampled_unigram_p_value", q["unigram_p_value"], "", higher_is_better=True, headline=False,
               label="unigram test p"),
    ]
