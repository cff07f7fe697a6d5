"""Adaptive diffusion steps on the quick zoo's digits pipeline: fewer steps, quality beside them, and an
untouched pipeline afterwards."""

import json
import subprocess

import numpy as np
import pytest
import torch

from workbench import runner
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._execute import draw
from workbench.techniques.adaptive_steps import AdaptiveSteps
from workbench.techniques.base import TechniqueParamError
from workbench.workloads import Batch

STEPS = 10  # the baseline's fixed steps; the reference uses as many, so the baseline is the reference
POLICIES = {  # small settings: the quick zoo's images settle within 10 steps
    "predictor": {"policy": "predictor", "reference_steps": STEPS, "candidate_steps": "4,6,8", "train_seeds": 2},
    "convergence": {"policy": "convergence", "reference_steps": STEPS, "tolerance": 0.05},
}


def digits_spec(params: dict, max_items: int = 4, batch_size: int = 1, workload: str = "digits") -> RunSpec:
    return RunSpec(ModelSpec("zoo:digits-diffusion"),
                   WorkloadSpec(workload, max_items=max_items, batch_size=batch_size, num_inference_steps=STEPS),
                   TechniqueSpec("adaptive_steps", params), repeats=1, warmup=0)


def prepared(model, params: dict, **spec_args) -> AdaptiveSteps:
    spec = digits_spec(params, **spec_args)
    technique = AdaptiveSteps(**params)
    technique.prepare(runner.build_trial(runner.plan(spec), model=model))
    return technique


def pipeline_state(pipe) -> dict:
    scheduler = pipe.scheduler
    return {"scheduler_type": type(scheduler), "config": dict(scheduler.config),
            "timesteps": scheduler.timesteps.clone(), "num_inference_steps": scheduler.num_inference_steps,
            "interrupt": vars(pipe).get("_interrupt", "absent"),
            "unet": {k: v.clone() for k, v in pipe.unet.state_dict().items()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert after["scheduler_type"] is before["scheduler_type"]
    assert after["config"] == before["config"]
    assert torch.equal(after["timesteps"], before["timesteps"])
    assert after["num_inference_steps"] == before["num_inference_steps"]
    assert after["interrupt"] == before["interrupt"]
    assert all(torch.equal(before["unet"][k], v) for k, v in after["unet"].items())


@pytest.fixture(scope="module")
def digits(quick_zoo):
    return load_model(ModelSpec("zoo:digits-diffusion"))


@pytest.fixture(scope="module")
def runs(quick_zoo):
    """One runner run per policy, shared by the tests that read its quality and internals."""
    return {name: runner.run(digits_spec(params), progress=False) for name, params in POLICIES.items()}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_policy_uses_fewer_steps_than_the_fixed_baseline(runs, policy):
    result = runs[policy]
    assert result.status == "ok", result.failure_reason
    assert result.quality["steps_baseline"] == STEPS
    assert result.quality["steps_technique_mean"] < STEPS
    internals = result.internals["technique"]
    assert internals["mean_steps"] == result.quality["steps_technique_mean"]
    per_input = internals["quality_details"]["steps_technique_per_input"]
    assert [row["steps"] for row in internals["steps_per_input"]] == per_input
    assert internals["seconds_per_step"]["steps_timed"] == sum(per_input)
    assert internals["seconds_per_step"]["median"] > 0


@pytest.mark.parametrize("policy", list(POLICIES))
def test_quality_keys_are_present_and_in_range(runs, policy):
    q = runs[policy].quality
    for key in ("ssim_baseline_vs_reference", "ssim_technique_vs_reference", "ssim_technique_vs_reference_min"):
        assert -1.0 <= q[key] <= 1.0
    for key in ("judge_accuracy_baseline", "judge_accuracy_technique", "judge_accuracy_reference",
                "ssim_target_met_rate_technique"):
        assert 0.0 <= q[key] <= 1.0
    assert runs[policy].internals["technique"]["quality_details"]["judge"] == "zoo:digits-judge"
    units = {m["name"]: m["unit"] for m in runs[policy].quality_metrics}  # typed: each figure with its unit
    assert units["ssim_technique_vs_reference"] == "SSIM" and units["judge_accuracy_change_points"] == "points"
    assert q["psnr_db_technique_vs_reference"] is None or q["psnr_db_technique_vs_reference"] > 0
    # the baseline draws as many steps as the reference, from the same seeds: it is the reference
    assert q["ssim_baseline_vs_reference"] == pytest.approx(1.0)
    assert q["identical_to_reference_rate_baseline"] == 1.0
    # the standard image comparison is still there for the display
    assert q["inputs"] == 4 and "psnr_db_mean" in q


def test_predictor_trains_on_seeds_disjoint_from_the_evaluation_seeds(runs):
    predictor = runs["predictor"].internals["technique"]["predictor"]
    evaluation = {int(s) for s in runs["predictor"].internals["technique"]["chosen_steps_by_seed"]}
    assert evaluation == set(predictor["evaluation_seeds"]) and len(evaluation) == 4
    assert not set(predictor["training_seeds"]) & evaluation
    assert predictor["seeds_disjoint"] is True
    assert predictor["training_images"] == 10 * 2 == len(predictor["training_data"]["rows"])
    assert 0.0 <= predictor["cv_under_prediction_rate"] <= 1.0 and predictor["cv_mae_steps"] >= 0.0
    labels = {row[2] for row in predictor["training_data"]["rows"]}
    assert labels <= {4, 6, 8, STEPS}


def test_predictor_runs_the_steps_it_chose_in_input_order(digits):
    technique = prepared(digits, POLICIES["predictor"], max_items=6, batch_size=3)
    try:
        unet_rows = []
        hook = digits.model.unet.register_forward_hook(lambda m, args, out: unet_rows.append(args[0].shape[0]))
        try:
            outputs = [technique.run(batch) for batch in technique.batches_]
        finally:
            hook.remove()
        chosen = technique.chosen_steps_by_seed_
        ran = [s for out in outputs for s in out.internals["steps"]]
        assert ran == [chosen[s] for b in technique.batches_ for s in b.seeds]
        assert sum(unet_rows) == sum(ran)  # every image ran exactly its chosen steps through the UNet
        for batch, out in zip(technique.batches_, outputs):
            for row, seed in enumerate(batch.seeds):
                alone = Batch(1, class_labels=[batch.class_labels[row]], seeds=[seed])
                expected = draw(digits.model, alone, chosen[seed]).output[0]
                np.testing.assert_allclose(out.output[row], expected, atol=1e-5)
    finally:
        technique.release()


def test_convergence_with_tolerance_zero_never_stops_early(digits):
    technique = prepared(digits, {"policy": "convergence", "tolerance": 0.0, "max_steps": 7}, max_items=4,
                         batch_size=2)
    try:
        for batch in technique.batches_:
            out = technique.run(batch)
            assert out.internals["steps"] == [7] * batch.size
            np.testing.assert_allclose(np.stack(out.output), np.stack(draw(digits.model, batch, 7).output), atol=1e-6)
        report = technique.internals([technique.run(b).internals for b in technique.batches_])
        assert report["stopped_early_rate"] == 0.0
    finally:
        technique.release()


def test_convergence_returns_the_clean_prediction_at_the_stop(digits):
    technique = prepared(digits, POLICIES["convergence"], max_items=1)
    try:
        batch = technique.batches_[0]
        out = technique.run(batch)
        stop = out.internals["steps"][0]
        assert stop < STEPS
        seen = {}

        def capture(pipe, index, timestep, kwargs):
            seen[index + 1] = kwargs["pred_original_sample"].clone()
            return {}

        draw(digits.model, batch, STEPS, callback_on_step_end=capture,
             callback_on_step_end_tensor_inputs=["pred_original_sample"])
        clean = (seen[stop] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0]  # (8, 8, 1) in [0, 1]
        np.testing.assert_allclose(out.output[0], clean, atol=1e-5)
    finally:
        technique.release()


@pytest.mark.parametrize("policy", list(POLICIES))
def test_release_restores_the_pipeline(digits, policy):
    before = pipeline_state(digits.model)
    technique = prepared(digits, POLICIES[policy])
    technique.run(technique.batches_[0])
    assert digits.model.scheduler.num_inference_steps != before["num_inference_steps"]  # our calls did change it
    technique.release()
    assert_same_state(before, pipeline_state(digits.model))


def test_release_restores_the_pipeline_after_failures(digits, tmp_path):
    before = pipeline_state(digits.model)
    # a run that fails after successful calls
    technique = prepared(digits, POLICIES["convergence"], max_items=2)
    with pytest.raises(ValueError, match="class_labels"):
        technique.run(Batch(1, class_labels=[42], seeds=[0]))
    technique.release()
    assert_same_state(before, pipeline_state(digits.model))
    # a prepare that fails half way (the second input's class does not exist)
    workload = tmp_path / "bad.jsonl"
    workload.write_text('{"class_label": 1}\n{"class_label": 42}\n')
    params = POLICIES["predictor"]
    technique = AdaptiveSteps(**params)
    with pytest.raises(ValueError, match="class_labels"):
        technique.prepare(runner.build_trial(runner.plan(digits_spec(params, workload=str(workload))), model=digits))
    technique.release()
    assert_same_state(before, pipeline_state(digits.model))


@pytest.mark.parametrize("params, words", [
    ({"policy": "fastest"}, ["policy", "'fastest'", "predictor", "convergence"]),
    ({"ssim_target": 1.5}, ["ssim_target", "1.5", "0.9"]),
    ({"candidate_steps": "4,x"}, ["candidate_steps", "4,x"]),
    ({"policy": "predictor", "tolerance": 0.1}, ["tolerance", "policy=convergence"]),
])
def test_bad_params_give_one_clear_line(params, words):
    with pytest.raises(TechniqueParamError) as err:
        AdaptiveSteps(**params)
    message = str(err.value)
    assert "\n" not in message
    assert all(word in message for word in words)


def test_convergence_on_a_pipeline_without_pred_original_sample_is_refused_before_loading(tmp_path):
    from workbench.models.facts import read_facts
    from workbench.techniques.base import Facts

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    facts = Facts(read_facts(ModelSpec(str(tmp_path))), None, "cpu", 0)
    spec = digits_spec({"policy": "convergence"})
    reason = AdaptiveSteps(policy="convergence").check(facts, spec)
    assert "StableDiffusionPipeline" in reason and "pred_original_sample" in reason and "policy=predictor" in reason
    assert AdaptiveSteps(policy="predictor").check(facts, spec) is None


def test_cli_reports_speed_and_quality_side_by_side(quick_zoo, cli_env, workbench_cmd):
    params = [arg for key, value in POLICIES["convergence"].items() for arg in ("--param", f"{key}={value}")]
    completed = subprocess.run(
        [*workbench_cmd, "run", "--technique", "adaptive_steps", "--model", "zoo:digits-diffusion",
         "--workload", "digits", "--steps", str(STEPS), "--max-items", "2", "--repeats", "1", "--json", *params],
        capture_output=True, text=True, env=cli_env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    row = json.loads(completed.stdout)
    assert row["status"] == "ok"
    assert row["speedup"] > 0 and set(row["summary"]["variants"]) == {"baseline", "adaptive_steps"}
    assert row["quality"]["steps_technique_mean"] < row["quality"]["steps_baseline"] == STEPS
    assert 0.0 <= row["quality"]["judge_accuracy_technique"] <= 1.0
    assert -1.0 <= row["quality"]["ssim_technique_vs_reference"] <= 1.0
    assert row["internals"]["technique"]["policy"] == "convergence"
