"""Speculative decoding: lossless greedy output, cache rollback, the sampling distribution, applicability
errors and models left unchanged, on the quick zoo and tiny real GPT-2 models."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.errors import NotApplicableError
from workbench.models.loading import load_model
from workbench.runner import build_trial, execute, plan, run
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._speculative_loop import (LookupDrafter, ModelDrafter, SelfDrafter,
                                                    expected_tokens_per_round, measure_step_costs,
                                                    speculative_generate, theoretical_speedup)
from workbench.techniques.speculative import Speculative
from workbench.workloads import Batch

PROMPTS = ["def parse_header(self, line):\n    ", "class Reader:\n    def __init__(self", "import os\n\ndef walk("]


@pytest.fixture(scope="module")
def pair(quick_zoo: Path):
    return load_model(ModelSpec("zoo:code-target")), load_model(ModelSpec("zoo:code-draft"))


def _greedy(model, ids, n):
    with torch.inference_mode():
        out = model.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


class WrongDrafter(LookupDrafter):
    """Proposes tokens the target never picks first (its greedy token plus one), so every round rolls back."""

    def __init__(self, target) -> None:
        super().__init__()
        self.target = target

    def propose(self, seq, k, sample, temperature):
        best = int(self.target(input_ids=seq).logits[0, -1].argmax())
        vocab = self.target.config.vocab_size
        return [(best + 1 + j) % vocab for j in range(k)], None


@pytest.mark.parametrize("schedule", ["constant", "heuristic_transient"])
def test_loop_output_equals_target_greedy_for_every_drafter(pair, schedule):
    target, draft = pair
    drafters = {"draft": ModelDrafter(draft.model), "self": SelfDrafter(target.model, 2),
                "lookup": LookupDrafter(), "wrong": WrongDrafter(target.model),
                "confident": ModelDrafter(draft.model, confidence_threshold=0.5)}
    for prompt in PROMPTS:
        ids = target.tokenizer(prompt, return_tensors="pt").input_ids
        reference = _greedy(target, ids, 24)
        for name, drafter in drafters.items():
            with torch.inference_mode():
                tokens, stats = speculative_generate(target.model, drafter, ids, 24, draft_tokens=3, schedule=schedule,
                                                     eos_token_id=target.tokenizer.eos_token_id)
            assert tokens == reference, (name, prompt)
            assert stats.new_tokens == len(tokens)
            assert sum(stats.accepted_by_position[:1]) <= stats.rounds
    # The wrong drafter had every proposal rejected, so the output above was produced through rollbacks.
    with torch.inference_mode():
        _, stats = speculative_generate(target.model, WrongDrafter(target.model), ids, 12, draft_tokens=3)
    assert stats.rejections == stats.proposed_by_position[0] > 0 and sum(stats.accepted_by_position) == 0


# The rollback test (a cropped cache equals a fresh one, the drafter's cache cut back) runs per LM family,
# GPT-2 included, in tests/test_architectures.py::test_rollback_leaves_the_caches_as_if_rejected_tokens_never_ran.


# ----------------------------------------------------------------------------------------------
# Sampling: every emitted token must follow the target's own distribution


def _tiny(seed: int, layers: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=5, n_embd=16, n_layer=layers, n_head=2, n_positions=32)).eval()
    with torch.no_grad():  # sharper distributions than the random init, so draft and target really differ
        model.lm_head.weight.mul_(8.0)
    return model


def _exact_marginals(model, prompt: torch.Tensor, steps: int) -> np.ndarray:
    """P(token at each of the first ``steps`` new positions) under plain sampling, enumerating every prefix."""
    vocab, start = model.config.vocab_size, prompt.shape[1]
    marginals = np.zeros((steps, vocab))
    with torch.no_grad():
        for i in range(steps):
            for prefix in itertools.product(range(vocab), repeat=i):
                seq = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long).view(1, i)], dim=1)
                probs = torch.softmax(model(input_ids=seq).logits[0].double(), dim=-1)  # (T, V)
                weight = float(np.prod([float(probs[start - 1 + j, t]) for j, t in enumerate(prefix)]))
                marginals[i] += weight * probs[start - 1 + i].numpy()
    return marginals


@pytest.mark.parametrize("drafter_name", ["draft model", "prompt lookup"])
def test_sampled_tokens_follow_the_target_distribution(drafter_name):
    target, other = _tiny(1, 2), _tiny(2, 1)
    prompt = torch.tensor([[1, 2, 1, 2, 1]])
    steps, samples = 3, 1500
    exact = _exact_marginals(target, prompt, steps)
    assert np.allclose(exact.sum(axis=1), 1.0)
    drafter = ModelDrafter(other) if drafter_name == "draft model" else LookupDrafter()
    counts = np.zeros_like(exact)
    torch.manual_seed(0)
    with torch.inference_mode():
        for _ in range(samples):
            tokens, _ = speculative_generate(target, drafter, prompt, steps, draft_tokens=2, do_sample=True)
            for i, token in enumerate(tokens):
                counts[i, token] += 1
    for i in range(steps):
        assert chisquare(counts[i], samples * exact[i]).pvalue > 1e-4, (i, counts[i], samples * exact[i])
    # The test has power: the draft's own samples (what accepting every proposal would give) fail it.
    if drafter_name == "draft model":
        draft_counts = np.zeros(exact.shape[1])
        with torch.inference_mode():
            for _ in range(samples):
                probs = torch.softmax(other(input_ids=prompt).logits[0, -1], dim=-1)
                draft_counts[int(torch.multinomial(probs, 1))] += 1
        assert chisquare(draft_counts, samples * exact[0]).pvalue < 1e-4


def test_theoretical_speedup_matches_the_paper_limits():
    assert theoretical_speedup(0.0, 4, 0.0) == pytest.approx(1.0)  # nothing accepted, free draft: no gain
    assert theoretical_speedup(1.0, 4, 0.0) == pytest.approx(5.0)  # everything accepted, free draft: g + 1
    assert theoretical_speedup(0.5, 3, 0.5) < 1.0  # a costly, poor draft slows decoding down


def test_theoretical_speedup_with_a_measured_verification_cost():
    # SmolLM2 on CPU: a 5-token verification pass 70 ms, a one-token step 52 ms, so v = 70/52, not 1.
    # a = 0.8, g = 4: (1 - 0.8^5) / 0.2 = 3.3616 tokens per round, for 4 x 0.1 + 70/52 steps.
    assert theoretical_speedup(0.8, 4, 0.1, verify_cost_ratio=70 / 52) == pytest.approx(3.3616 / (0.4 + 70 / 52))
    assert theoretical_speedup(0.8, 4, 0.1, verify_cost_ratio=1.0) == theoretical_speedup(0.8, 4, 0.1)
    # everything accepted, free draft, but verifying 5 tokens costs 5 steps: no gain left
    assert theoretical_speedup(1.0, 4, 0.0, verify_cost_ratio=5.0) == pytest.approx(1.0)
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError, match="verify_cost_ratio=0"):
        theoretical_speedup(0.5, 4, 0.1, verify_cost_ratio=0)


def test_step_costs_time_both_passes_on_one_context(pair):
    target, _ = pair
    ids = target.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    costs = measure_step_costs(target.model, ids, verify_tokens=5, repeats=4, warmup=1)
    assert costs.context_tokens == ids.shape[1] and costs.verify_tokens == 5 and costs.repeats == 4
    assert costs.one_token_step_s > 0 and costs.verify_pass_s > 0
    assert costs.to_dict()["verify_cost_ratio"] == pytest.approx(costs.verify_pass_s / costs.one_token_step_s)


# ----------------------------------------------------------------------------------------------
# Applicability: one clear line, before any weight loads


def _spec(**technique) -> RunSpec:
    draft = technique.pop("draft", None)
    batch = technique.pop("batch_size", 1)
    model = technique.pop("model", "zoo:code-target")
    return RunSpec(ModelSpec(model), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=8, batch_size=batch),
                   TechniqueSpec("speculative", technique, ModelSpec(draft) if draft else None), repeats=1, warmup=0)


@pytest.mark.parametrize("spec, words", [
    (dict(draft="zoo:code-draft", batch_size=2), "batch size 1"),
    (dict(), "needs a drafter"),
    (dict(draft="zoo:code-draft", draft_layers=1), "give one drafter"),
    (dict(draft_layers=99), "draft_layers=99 but the target has"),
    (dict(draft="zoo:code-classifier"), "must be a causal LM"),
    (dict(model="zoo:code-draft", draft="zoo:code-target"), "not smaller than the target"),
])
def test_inapplicable_settings_fail_in_plan_with_one_line(quick_zoo, spec, words):
    with pytest.raises(NotApplicableError, match=words) as error:
        plan(_spec(**spec))
    assert "\n" not in str(error.value)


def test_tokenizer_mismatch_is_refused_before_loading(quick_zoo, pair, tmp_path):
    _, draft = pair
    other = tmp_path / "other-tokenizer-draft"
    draft.model.save_pretrained(other)
    draft.tokenizer.train_new_from_iterator(["completely different text"] * 20, vocab_size=280).save_pretrained(other)
    with pytest.raises(NotApplicableError, match="different tokenizer"):
        plan(_spec(draft=str(other)))


def test_failed_hf_self_speculation_leaves_the_model_unchanged(pair):
    target, _ = pair
    config, generation = target.model.config.to_dict(), target.model.generation_config.to_dict()
    weights = {k: v.clone() for k, v in target.model.state_dict().items()}
    # check() refuses this pair at plan time (naming GPT2LMHeadModel); prepared directly, past the check,
    # transformers' failure must still leave the shared model as it was once released.
    with pytest.raises(NotApplicableError, match="GPT2LMHeadModel"):
        plan(_spec(implementation="hf", draft_layers=1))
    technique = Speculative(implementation="hf", draft_layers=1)
    spec = _spec(implementation="hf", prompt_lookup_num_tokens=3)
    technique.prepare(build_trial(plan(spec), model=target))
    batch = Batch(size=1, inputs=dict(target.tokenizer(PROMPTS[0], return_tensors="pt")), texts=[PROMPTS[0]])
    with pytest.raises(Exception):  # transformers' assistant_early_exit cannot run GPT-2
        technique.run(batch)
    assert target.model.config.to_dict() != config  # transformers left the config changed ...
    technique.release()
    assert target.model.config.to_dict() == config  # ... and release put it back
    assert target.model.transformer.config is target.model.config
    assert target.model.generation_config.to_dict() == generation
    for key, value in target.model.state_dict().items():
        assert torch.equal(value, weights[key])


def test_failed_variant_through_the_runner_is_stored_as_failed_and_model_restored(quick_zoo):
    # A variant that fails inside transformers (HF self-speculation on GPT-2, which check() refuses, given
    # to the runner in a plan past the check): a failed result, not an exception.
    planned = dataclasses.replace(plan(_spec(implementation="hf", prompt_lookup_num_tokens=3)),
                                  technique=Speculative(implementation="hf", draft_layers=1))
    result = execute(planned, progress=False)
    assert result.status == "failed" and result.failure_reason
    # A following run in the same process sees the model as saved (loads are fresh, but the config
    # object HF mutates is restored in place, so nothing leaks either way).
    ok = execute(plan(_spec(draft="zoo:code-draft")), progress=False)
    assert ok.status == "ok", ok.failure_reason


# ----------------------------------------------------------------------------------------------
# End to end: the acceptance command, on the zoo pair and on a plain save_pretrained pair


def _cli_json(workbench_cmd, cli_env, *args) -> dict:
    done = subprocess.run([*workbench_cmd, "run", "--technique", "speculative", "--workload", "code-prompts",
                           "--max-items", "3", "--max-new-tokens", "16", "--repeats", "2", "--json", *args],
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _check_report(report: dict) -> None:
    assert report["status"] == "ok"
    assert report["quality"]["exact_match_rate"] == 1.0
    assert all(row["baseline_tokens"] == row["technique_tokens"] for row in report["outputs"])
    tech = report["internals"]["technique"]
    assert tech["implementation"] == "workbench loop"
    positions = tech["acceptance_by_position"]
    assert [p["position"] for p in positions] == list(range(1, len(positions) + 1))
    assert all(0 <= p["accepted"] <= p["proposed"] for p in positions)
    assert tech["predicted_speedup"] > 0 and report["speedup"] > 0
    assert 0 <= tech["acceptance_rate"] <= 1 and tech["cost_ratio_c"] > 0
    # the prediction is the formula on the reported, measured inputs: c and v over a one-token step
    assert tech["one_token_step_s"] > 0 and tech["verify_pass_s"] > 0 and tech["verify_pass_tokens"] == 5
    assert tech["verify_cost_ratio"] == pytest.approx(tech["verify_pass_s"] / tech["one_token_step_s"])
    assert tech["predicted_speedup"] == pytest.approx(theoretical_speedup(
        tech["acceptance_rate"], tech["mean_draft_tokens"], tech["cost_ratio_c"], tech["verify_cost_ratio"]))
    per_round_s = tech["target_verify_seconds"] / tech["rounds"]
    assert tech["cost_ratio_c"] == pytest.approx(
        tech["draft_seconds"] / sum(p["proposed"] for p in positions) / per_round_s * tech["verify_cost_ratio"])
    assert tech["one_token_step_in_loop_s"] == pytest.approx(per_round_s / tech["verify_cost_ratio"])
    assert 0 <= tech["prefill_share"] <= 1 and tech["loop_overhead_share"] < 1 and tech["theory_leaves_out"]


def test_cli_zoo_pair_reports_identical_outputs_acceptance_and_both_speedups(quick_zoo, workbench_cmd, cli_env):
    _check_report(_cli_json(workbench_cmd, cli_env, "--model", "zoo:code-target", "--draft", "zoo:code-draft"))


def test_cli_any_save_pretrained_gpt2_pair_works_the_same(pair, workbench_cmd, cli_env, tmp_path):
    target, draft = pair
    folders = {}
    for name, loaded in (("my-target", target), ("my-draft", draft)):
        folders[name] = tmp_path / name
        loaded.model.save_pretrained(folders[name])
        loaded.tokenizer.save_pretrained(folders[name])
    _check_report(_cli_json(workbench_cmd, cli_env, "--model", str(folders["my-target"]),
                            "--draft", str(folders["my-draft"])))


# ----------------------------------------------------------------------------------------------
# Sampled runs: a sampled baseline, and quality by distribution, never by token identity


def test_sampled_run_has_a_sampled_baseline_and_a_distributional_quality(quick_zoo):
    results = {}
    for seed in (0, 1):
        spec = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=10),
                       TechniqueSpec("speculative", {"do_sample": True, "temperature": 0.8},
                                     ModelSpec("zoo:code-draft")), repeats=1, warmup=0, seed=seed)
        results[seed] = run(spec, store=None, progress=False)
        assert results[seed].status == "ok", results[seed].failure_reason
    # The baseline samples: its outputs change with the seed (greedy ones would not).
    assert [r["baseline_tokens"] for r in results[0].outputs] != [r["baseline_tokens"] for r in results[1].outputs]
    quality, report = results[0].quality, results[0].report
    assert quality["comparison"] == "distributional (sampled)"
    assert quality["sampling"] == {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0}
    assert quality["inputs"] == 2 and quality["samples_per_prompt"] == 8
    assert 0 < quality["p_value"] <= 1 and isinstance(quality["passed"], bool)
    assert "token_agreement" not in quality and "exact_match_rate" not in quality
    assert {m["name"] for m in report["quality"]} >= {"sampled_distribution_p_value", "sampled_score_change_nats"}
    assert report["lossless"] is False
