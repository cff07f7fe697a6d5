"""Early exit on real quick-zoo models: exits, policies, the threshold curve, and an untouched model."""

import json
import subprocess

import pytest
import torch
from torch import nn

from workbench import runner
from workbench.errors import NotApplicableError
from workbench.models.loading import LoadedModel, load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques._execute import classify
from workbench.techniques.base import Outcome, TechniqueParamError
from workbench.techniques.early_exit import EarlyExit
from workbench.workloads import Batch

FAST = {"thresholds": "0.5,0.9", "train_steps": 40, "curve_repeats": 1}  # a short prepare


def classifier_spec(max_items: int = 8, batch_size: int = 4, **params) -> RunSpec:
    return RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=max_items,
                                                                  batch_size=batch_size),
                   TechniqueSpec("early_exit", {**FAST, **params}), repeats=1)


def trial_for(spec: RunSpec, model):
    """The trial the runner would build, on an already loaded (or fake) model."""
    return runner.build_trial(runner.plan(spec), model=model)


def prepared(model, **params) -> EarlyExit:
    spec = classifier_spec(**params)
    technique = EarlyExit(**spec.technique.param_dict)
    technique.prepare(trial_for(spec, model))
    return technique


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_unchanged(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, config = before
    after = model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert model.config.to_dict() == config


@pytest.fixture(scope="module")
def classifier(quick_zoo):
    return load_model(ModelSpec("zoo:code-classifier"))


def test_never_exiting_reproduces_the_model_predictions(classifier):
    technique = prepared(classifier, threshold=1.0)
    for batch in technique.batches_:
        out = technique.run(batch)
        assert out.output == classify(classifier.model, batch).output
        assert out.internals["exit_layers"] == [technique.stack_.num_layers] * batch.size


def test_a_low_threshold_executes_fewer_layers(classifier):
    never, always = prepared(classifier, threshold=1.0), prepared(classifier, threshold=0.0)
    layers = {}
    for name, technique in (("never", never), ("always", always)):
        calls = [technique.run(b).internals for b in technique.batches_]
        layers[name] = technique.internals(calls)
    assert layers["never"]["mean_layers_executed"] == layers["never"]["num_layers"] == 4
    assert layers["always"]["mean_layers_executed"] == 1.0
    assert layers["always"]["exit_layer_histogram"] == {1: 8}
    assert layers["always"]["threshold_used"] == 0.0


def test_patience_exits_only_after_agreeing_layers(classifier):
    technique = prepared(classifier, policy="patience", patience=2)
    stack, heads = technique.stack_, technique.heads_
    for batch in technique.batches_:
        out = technique.run(batch)
        with torch.inference_mode():
            hidden = stack.hidden_states(batch.inputs)
            labels = torch.stack([heads.logits(i, hidden[i][:, 0]).argmax(-1)
                                  for i in range(stack.num_layers - 1)], dim=1)  # (B, L-1)
        for row, layer in enumerate(out.internals["exit_layers"]):
            assert layer >= 2  # patience 2 needs two layers' predictions
            if layer < stack.num_layers:  # exited: the last two exit heads agreed, and gave the output
                assert labels[row, layer - 1] == labels[row, layer - 2] == out.output[row]
            else:  # ran to the end: no two consecutive exit heads agreed
                assert all(labels[row, i] != labels[row, i + 1] for i in range(stack.num_layers - 2))
    curve = technique.internals([])["threshold_curve"]
    assert [p["patience"] for p in curve] == [1, 2, 3]
    assert [p["mean_layers_executed"] for p in curve][0] == 1.0


def test_curve_and_operating_point(classifier):
    technique = prepared(classifier, max_accuracy_drop_points=1.0)
    calls = [technique.run(b).internals for b in technique.batches_]
    report = technique.internals(calls)
    assert {"threshold_curve", "operating_point", "threshold_used", "policy", "exit_layer_histogram",
            "mean_layers_executed", "num_layers", "heads_training"} <= set(report)
    curve = report["threshold_curve"]
    assert [p["threshold"] for p in curve] == [0.5, 0.9, 1.0]  # 1.0: never exits, always measured
    assert curve[-1]["mean_layers_executed"] == 4.0 and curve[-1]["accuracy"] == curve[-1]["accuracy_full"]
    for point in curve:
        assert {"threshold", "accuracy", "accuracy_full", "mean_layers_executed", "median_latency_s",
                "speedup_vs_full"} <= set(point)
        assert 1.0 <= point["mean_layers_executed"] <= 4.0 and point["speedup_vs_full"] > 0
    chosen = report["operating_point"]
    if "fallback" in chosen:  # no threshold kept accuracy: the full depth, said so
        assert chosen["threshold"] == 1.0
        assert all(p["accuracy"] < p["accuracy_full"] - 0.01 for p in curve)
    else:
        assert chosen["accuracy"] >= chosen["accuracy_full"] - 0.01
        allowed = [p for p in curve if p["accuracy"] >= p["accuracy_full"] - 0.01]
        assert chosen["speedup_vs_full"] == max(p["speedup_vs_full"] for p in allowed)
    assert report["threshold_used"] == chosen["threshold"]  # threshold unset: the operating point's
    assert sum(report["exit_layer_histogram"].values()) == 8
    training = report["heads_training"]
    assert training["items"] == 4 and training["curve_items"] == 4 and training["steps"] == 40  # two halves
    assert len(training["per_layer_head_accuracy"]) == 3 and len(training["per_layer_train_accuracy"]) == 3


def test_heads_and_the_operating_point_never_see_the_timed_inputs(classifier, tmp_path):
    """The heads train, and the curve is measured, on the calibration split: no timed text among them."""
    technique = prepared(classifier)
    timed = {text for batch in technique.batches_ for text in batch.texts}
    calibration = {text for batch in technique.calibration_ for text in batch.texts}
    assert len(calibration) == 8 and not timed & calibration
    heads = {text for batch in technique.head_batches_ for text in batch.texts}
    curve = {text for batch in technique.curve_batches_ for text in batch.texts}
    assert heads | curve == calibration and not heads & curve  # heads fitted on one half, threshold chosen on the other
    assert technique.training_["items"] == len(heads) == 4
    spec = classifier_spec()
    assert technique.report(Outcome([], [], [], {})).lossless is False  # typed report, lossy
    # a file whose every line is timed leaves nothing to calibrate on: refused at plan time
    path = tmp_path / "snippets.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"def f{i}(): pass", "label": 0}) for i in range(4)))
    too_few = RunSpec(spec.model, WorkloadSpec(str(path), max_items=None), spec.technique)
    with pytest.raises(NotApplicableError, match="calibration"):
        runner.plan(too_few)


def test_the_model_is_unchanged_after_release_even_after_a_failing_run(classifier):
    before = snapshot(classifier.model)
    grads = [p.requires_grad for p in classifier.model.parameters()]
    technique = prepared(classifier)
    technique.run(technique.batches_[0])
    technique.release()
    assert_unchanged(classifier.model, before)
    # A call that fails half way (token ids beyond the vocabulary) must leave nothing behind either.
    technique = prepared(classifier)
    ids = torch.full((2, 5), 10_000)
    bad = Batch(2, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["x", "y"], labels=[0, 0],
                seeds=[0, 1])
    with pytest.raises(IndexError):
        technique.run(bad)
    technique.release()
    assert_unchanged(classifier.model, before)
    assert [p.requires_grad for p in classifier.model.parameters()] == grads
    assert not classifier.model.training


def test_unsupported_models_get_one_clear_line(classifier):
    spec = classifier_spec()
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    fake = LoadedModel(ModelSpec("zoo:code-classifier"), "classifier", mlp, classifier.tokenizer, "cpu",
                       "float32", "-", {})
    trial = trial_for(spec, classifier)
    trial.model = fake  # the runner's batches, then a model early exit cannot split into layers
    with pytest.raises(NotApplicableError, match="Sequential") as err:
        EarlyExit(**FAST).prepare(trial)
    assert "\n" not in str(err.value)
    diffusion = RunSpec(ModelSpec("zoo:digits-diffusion"), WorkloadSpec("digits", max_items=2),
                        TechniqueSpec("early_exit"))
    with pytest.raises(NotApplicableError, match="not to a diffusion model"):
        runner.plan(diffusion)


@pytest.mark.parametrize("params, fragment", [
    ({"threshold": 1.5}, "threshold=1.5"),
    ({"thresholds": "0.5,high"}, "thresholds='0.5,high'"),
    ({"thresholds": "0.5,2"}, "in [0, 1]"),
    ({"patience": 2}, "policy=patience"),
    ({"policy": "patience", "threshold": 0.9}, "policy=confidence"),
    ({"policy": "fastest"}, "policy='fastest'"),
])
def test_bad_parameters_name_the_value(params, fragment):
    with pytest.raises(TechniqueParamError, match=None) as err:
        EarlyExit(**params)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_json_shows_the_curve(quick_zoo, cli_env, workbench_cmd, tmp_path):
    done = subprocess.run(
        [*workbench_cmd, "run", "--technique", "early_exit", "--model", "zoo:code-classifier",
         "--workload", "code-snippets", "--max-items", "6", "--batch-size", "3", "--repeats", "1", "--json",
         "--quiet", "--param", "thresholds=0.5,0.9", "--param", "train_steps=30", "--param", "curve_repeats=1",
         "--store", f"sqlite:///{tmp_path / 'ee.sqlite'}"],
        env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "ok", data["failure_reason"]
    internals = data["internals"]["technique"]
    assert [p["threshold"] for p in internals["threshold_curve"]] == [0.5, 0.9, 1.0]
    assert {"accuracy", "mean_layers_executed", "speedup_vs_full"} <= set(internals["threshold_curve"][0])
    assert "operating_point" in internals and internals["num_layers"] == 4
    assert "accuracy_technique" in data["quality"]


# -- causal LMs (CALM-style) ----------------------------------------------------------------------


def lm_spec(**params) -> RunSpec:
    return RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", max_items=3, max_new_tokens=10),
                   TechniqueSpec("early_exit", {"thresholds": "0.5", "curve_repeats": 1, **params}), repeats=1)


@pytest.fixture(scope="module")
def causal_lm(quick_zoo):
    return load_model(ModelSpec("zoo:code-target"))


def test_lm_never_exiting_equals_greedy_and_low_threshold_runs_fewer_layers(causal_lm):
    before = snapshot(causal_lm.model)
    spec = lm_spec()
    never, always = EarlyExit(threshold=1.0, thresholds="0.5", curve_repeats=1), \
        EarlyExit(threshold=0.0, thresholds="0.5", curve_repeats=1, check_every=1)
    reports = {}
    for name, technique in (("never", never), ("always", always)):
        technique.prepare(trial_for(spec, causal_lm))
        outs = [technique.run(b) for b in technique.batches_]
        if name == "never":
            assert [o.output for o in outs] == [technique._full(b).output for b in technique.batches_]
        reports[name] = technique.internals([o.internals for o in outs])
        technique.release()
    layers = causal_lm.model.config.n_layer
    assert reports["never"]["mean_layers_executed"] == layers
    never_q, always_q = reports["never"]["text_quality"], reports["always"]["text_quality"]
    assert never_q["perplexity_change_percent"] == pytest.approx(0.0, abs=1e-6)
    assert never_q["next_token_kl_mean"] == pytest.approx(0.0, abs=1e-6)
    # exiting every token after layer 1 is a worse language model on the same text (this small random
    # model's distributions are flat, so the KL is small but not zero)
    assert always_q["perplexity_change_percent"] > 1.0 and always_q["next_token_kl_mean"] > 1e-4
    assert always_q["quality_text_tokens"] == never_q["quality_text_tokens"] > 16
    assert reports["always"]["mean_layers_executed"] < layers
    assert reports["always"]["exit_layer_histogram"].get(1, 0) > 0
    assert reports["always"]["block_calls_per_token"] < layers
    assert {"threshold_curve", "operating_point", "text_quality"} <= set(reports["always"])
    assert_unchanged(causal_lm.model, before)


def test_lm_exited_tokens_get_exact_cache_entries(causal_lm):
    """Exited tokens catch up on the deeper layers later: the cache must equal the full model's."""
    from transformers import DynamicCache

    from workbench.techniques._layers import decoder_stack

    stack = decoder_stack(causal_lm.model)
    ids = torch.tensor([[5, 17, 42, 9]])
    # exits everywhere but the last token: every deeper layer catches up in one batched call at the end
    out = calm_generate_steps(stack, ids)
    full = DynamicCache(config=causal_lm.model.config)
    with torch.inference_mode():
        causal_lm.model(input_ids=torch.cat([ids, torch.tensor([out["tokens"][:-1]])], 1), cache=full,
                        use_cache=True)
    for mine, reference in zip(out["cache"].layers, full.layers, strict=True):  # every layer, deep ones included
        assert mine.keys.shape == reference.keys.shape
        assert torch.allclose(mine.keys, reference.keys, atol=1e-5)
        assert torch.allclose(mine.values, reference.values, atol=1e-5)


def calm_generate_steps(stack, ids):
    """Decode 4 tokens exiting after layer 1 for three, then a full-depth token; return tokens and cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=stack.model.config)
    with torch.inference_mode():
        hidden = stack.embed(ids, 0)
        for index in range(stack.num_layers):
            hidden = stack.layer(index, hidden, cache)
        tokens = [int(stack.logits(hidden[:, -1]).argmax(-1))]
        waiting, position = None, ids.shape[1]
        for step in range(4):
            hidden = stack.layer(0, stack.embed(torch.tensor([[tokens[-1]]]), position), cache)
            position += 1
            if step < 3:  # exit after layer 1: the token waits for layer 2
                waiting = hidden if waiting is None else torch.cat([waiting, hidden], 1)
                tokens.append(int(stack.logits(hidden[:, -1]).argmax(-1)))
                continue
            hidden = torch.cat([waiting, hidden], 1)  # (1, 4, H): three waiting tokens and this one
            for index in range(1, stack.num_layers):
                hidden = stack.layer(index, hidden, cache)
            tokens.append(int(stack.logits(hidden[:, -1]).argmax(-1)))
    return {"tokens": tokens, "cache": cache}


def test_lm_unsupported_architecture_and_batch_size(quick_zoo, causal_lm):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    fake = LoadedModel(ModelSpec("zoo:code-target"), "causal_lm", llama, causal_lm.tokenizer, "cpu", "float32",
                       "-", {})
    trial = trial_for(lm_spec(), causal_lm)
    trial.model = fake
    with pytest.raises(NotApplicableError, match="LlamaForCausalLM"):  # the layer stack's own refusal, too
        EarlyExit().prepare(trial)
    batched = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", batch_size=2),
                      TechniqueSpec("early_exit"))
    with pytest.raises(NotApplicableError, match="batch_size=1"):
        runner.plan(batched)
