"""The distributional check of sampled outputs (workbench.sampled_quality) on the quick zoo pair: the
workbench loop's speculative sampling passes against plain sampled ``generate``; a sampler at the wrong
temperature and one that always keeps the draft's token fail; the pieces are checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import sampled_quality as sq
from workbench.errors import WorkbenchError
from workbench.measure import CallOutput
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, WorkloadSpec
from workbench.techniques._execute import generate
from workbench.techniques._speculative_loop import ModelDrafter, speculative_generate
from workbench.workloads import load_workload, make_batches

TEMPERATURE = 0.8
NEW_TOKENS = 12
CHECK = sq.SampledCheck(samples_per_prompt=16)  # 6 prompts x 16 samples per side
SAMPLING = {"do_sample": True, "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def zoo_pair(quick_zoo: Path):
    target, draft = load_model(ModelSpec("zoo:code-target")), load_model(ModelSpec("zoo:code-draft"))
    workload = WorkloadSpec("code-prompts", max_items=6, max_new_tokens=NEW_TOKENS)
    return target, draft, make_batches(load_workload(workload), target, workload)


def _plain(target):
    return lambda batch: generate(target.model, target.tokenizer, batch, NEW_TOKENS, **SAMPLING)


def _loop(target, draft, temperature: float):
    drafter = ModelDrafter(draft.model)

    def run(batch):
        with torch.inference_mode():
            tokens, _ = speculative_generate(target.model, drafter, batch.inputs["input_ids"], NEW_TOKENS,
                                             draft_tokens=4, do_sample=True, temperature=temperature,
                                             eos_token_id=target.tokenizer.eos_token_id)
        return CallOutput(output=[tokens])
    return run


def _draft_only(draft):
    """A biased 'speculative' sampler that keeps every draft token: the draft's distribution, not the target's."""
    drafter = ModelDrafter(draft.model)

    def run(batch):
        drafter.reset()
        with torch.inference_mode():
            tokens, _ = drafter.propose(batch.inputs["input_ids"], NEW_TOKENS, True, TEMPERATURE)
        return CallOutput(output=[tokens])
    return run


@pytest.fixture(scope="module")
def baseline_samples(zoo_pair):
    target, _, batches = zoo_pair
    samples = sq.draw_samples(_plain(target), batches, CHECK.samples_per_prompt, seed=0, stream=0)
    return samples, sq.score_samples(target.model, sq.prompt_ids(batches), samples, TEMPERATURE)


def _against_baseline(zoo_pair, baseline_samples, run) -> sq.SampledComparison:
    target, _, batches = zoo_pair
    base, base_scores = baseline_samples
    other = sq.draw_samples(run, batches, CHECK.samples_per_prompt, seed=0, stream=1)
    scores = sq.score_samples(target.model, sq.prompt_ids(batches), other, TEMPERATURE)
    return sq.compare_samples(base_scores, scores, base, other, SAMPLING, CHECK)


def test_speculative_sampling_passes_against_plain_sampling(zoo_pair, baseline_samples):
    target, draft, _ = zoo_pair
    result = _against_baseline(zoo_pair, baseline_samples, _loop(target, draft, TEMPERATURE))
    assert result.passed, result
    assert result.p_value >= CHECK.alpha and result.inputs == 6 and result.samples_per_prompt == 16
    assert result.to_dict()["comparison"] == "distributional (sampled)"
    # the metrics a technique reports from it: the family p-value and the effect size, named with units
    metrics = {m.name: m for m in sq.metrics(result.to_dict())}
    assert metrics["sampled_distribution_p_value"].value == result.p_value
    assert metrics["sampled_score_change_nats"].unit == "nats"
    assert "passed" in metrics["sampled_distribution_p_value"].label


@pytest.mark.parametrize("biased, sign", [("cooler (temperature 0.5)", +1), ("keeps every draft token", -1)])
def test_biased_samplers_fail(zoo_pair, baseline_samples, biased, sign):
    target, draft, _ = zoo_pair
    run = _loop(target, draft, 0.5) if biased.startswith("cooler") else _draft_only(draft)
    result = _against_baseline(zoo_pair, baseline_samples, run)
    assert not result.passed, result
    assert result.p_value < CHECK.alpha
    # a cooler sampler picks likelier tokens (higher log p under the target); the draft's, less likely ones
    assert np.sign(result.score_difference_nats_per_token) == sign


def test_score_is_the_teacher_forced_mean_log_probability(zoo_pair):
    target, _, batches = zoo_pair
    prompt = sq.prompt_ids(batches[:1])[0]
    rows = [[5, 7, 9, 11], [3, 0]]  # different lengths: the shorter one is padded inside score_samples
    scores = sq.score_samples(target.model, [prompt], [rows], TEMPERATURE)
    with torch.inference_mode():
        for s, row in enumerate(rows):
            total, seq = 0.0, prompt
            for token in row:  # one step at a time, no padding, no batching
                logits = target.model(input_ids=seq).logits[0, -1].float()
                total += float(torch.log_softmax(logits / TEMPERATURE, dim=-1)[token])
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            assert scores[0, s] == pytest.approx(total / len(row), abs=1e-4)


def test_unigram_test_on_known_token_streams():
    rng = np.random.default_rng(0)

    def draw(weights):
        return [[list(rng.choice(6, size=10, p=weights)) for _ in range(12)] for _ in range(4)]

    even, skewed = np.full(6, 1 / 6), np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.1])
    a = draw(even)
    assert sq.unigram_test(a, a, permutations=500) == (0.0, 1.0)  # identical sets: distance 0, p 1
    assert sq.unigram_test(a, draw(even), permutations=500)[1] > 0.01
    distance, p = sq.unigram_test(a, draw(skewed), permutations=500)
    assert p < 0.01 and distance > 0.1


def test_draws_are_seeded_per_variant_stream(zoo_pair):
    target, _, batches = zoo_pair
    plain = _plain(target)
    first = sq.draw_samples(plain, batches[:2], 3, seed=4, stream=0)
    assert sq.draw_samples(plain, batches[:2], 3, seed=4, stream=0) == first  # reproducible
    assert sq.draw_samples(plain, batches[:2], 3, seed=4, stream=1) != first  # independent stream
    assert len(first) == 2 and all(len(per_prompt) == 3 for per_prompt in first)


@pytest.mark.parametrize("settings, words", [
    (dict(samples_per_prompt=1), "samples_per_prompt=1"),
    (dict(alpha=1.5), "alpha=1.5"),
    (dict(alpha=0.01, permutations=50), "permutations=50 is too few"),
])
def test_bad_settings_name_the_value(settings, words):
    with pytest.raises(WorkbenchError, match=words):
        sq.SampledCheck(**settings)
