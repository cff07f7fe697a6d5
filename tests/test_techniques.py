"""The contract test: every registered technique, run end to end on the quick zoo."""

import copy
import dataclasses

import pytest
import torch

from workbench import runner, techniques
from workbench.errors import NotApplicableError
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.base import Technique, TechniqueParamError, UnknownTechniqueError

EXAMPLES = [(name, example) for name in techniques.names() for example in techniques.get(name).examples]


def spec_from_example(name: str, example: dict) -> RunSpec:
    return RunSpec(
        model=ModelSpec(example["model"]),
        workload=WorkloadSpec(example["workload"], max_items=2, max_new_tokens=6,
                              num_inference_steps=example.get("steps", 50)),
        technique=TechniqueSpec(name, example.get("params", {}),
                                ModelSpec(example["draft"]) if example.get("draft") else None),
        repeats=2,
        warmup=1,
    )


@pytest.mark.parametrize("name", techniques.names())
def test_declares_the_contract(quick_zoo, name):
    cls = techniques.get(name)
    assert issubclass(cls, Technique) and cls.name == name
    assert cls.applies_to and set(cls.applies_to) <= {"causal_lm", "classifier", "diffusion"}
    assert cls.description
    assert cls.examples, f"technique {name} has no runnable example for the contract test"
    technique = cls()
    facts = runner.plan(spec_from_example(name, cls.examples[0])).facts
    for kind in {"causal_lm", "classifier", "diffusion"} - set(cls.applies_to):
        other = dataclasses.replace(facts, model=dataclasses.replace(facts.model, kind=kind))
        reason = technique.check(other, spec_from_example(name, cls.examples[0]))
        assert reason and kind in reason
    with pytest.raises(TechniqueParamError, match="valid parameters"):
        cls(no_such_param=1)


@pytest.mark.parametrize("name, example", EXAMPLES, ids=[f"{n}-{e['model']}" for n, e in EXAMPLES])
def test_runs_end_to_end_and_leaves_models_unchanged(quick_zoo, tmp_path, name, example):
    spec = spec_from_example(name, example)
    target = load_model(spec.model)
    before = {k: v.clone() for k, v in (target.model.unet if target.kind == "diffusion" else target.model).state_dict().items()}
    result = runner.run(spec, progress=False)
    assert result.status == "ok", result.failure_reason
    # the typed report: every field there, quality as named metrics with a unit and a direction
    report = result.report
    assert isinstance(report["lossless"], bool) and report["headline"]
    for metric in report["quality"]:
        assert metric["name"] in result.quality and isinstance(metric["unit"], str)
        assert metric["higher_is_better"] in (True, False, None)
    assert result.to_row()["lossless"] == report["lossless"]
    assert result.resources["baseline"]["model_bytes"] > 0
    variants = result.summary["variants"]
    assert set(variants) == {"baseline", name} or (name == "baseline" and len(variants) == 2)
    for stats in variants.values():
        assert stats["calls"] == 2 * 2 and stats["latency_s"]["median"] > 0
    assert result.quality["inputs"] == 2
    assert len(result.outputs) == 2
    # the runner loaded its own copy; a fresh load must still match what is on disk
    again = load_model(spec.model)
    after = (again.model.unet if again.kind == "diffusion" else again.model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _appears_everywhere(name, example, spec, result, tmp_path)


def _appears_everywhere(name: str, example: dict, spec: RunSpec, result, tmp_path) -> None:
    """Registration is the only edit a technique needs: its run is stored, named for people in the report's
    table, described to the learner by its own features, planned by a sweep and offered by the compare panel."""
    from workbench.meta import features
    from workbench.report.data import results_table
    from workbench.store import Store
    from workbench.sweep import parse_sweep, plan_sweep
    from workbench.widgets import compare

    cls = techniques.get(name)
    # 1. The store keeps the typed report's fields as columns.
    store = Store(f"sqlite:///{tmp_path / 'runs.sqlite'}")
    store.append(result.to_row())
    runs = store.runs()
    assert list(runs["technique"]) == [name] and runs["status"].iloc[0] == "ok"
    draft = example.get("draft")
    if name != "baseline":  # the reference itself is no candidate: the report and the learner leave its A/A runs out
        # 2. The report's table names the configuration as the technique does.
        table = results_table(runs)
        assert list(table["name"]) == [cls.display_name(dict(spec.technique.params), draft)]
        # 3. The learner sees the technique's own features (configuration group), never its name in code.
        row = features.run_features(runs).iloc[0]
        for key, value in (runs["technique_features"].iloc[0] or {}).items():
            if key in features.FEATURE_NAMES and isinstance(value, (int, float)) and value == value:
                assert row[key] == pytest.approx(float(value)), key
    # 4. A sweep plans it (plan-time checks included) and the compare panel offers it with its parameters.
    params = ", ".join(f"{k}: {v!r}" for k, v in example.get("params", {}).items())
    text = (f"models: [{example['model']}]\nworkloads: [{{name: {example['workload']}, max_items: 2}}]\n"
            f"techniques: [{{name: {name}, params: {{{params}}}" + (f", draft: {draft}" if draft else "") + "}]\n")
    planned = plan_sweep(parse_sweep(text))
    assert [p.spec.technique.name for p in planned] == [name] and all(p.skip_reason is None for p in planned)
    panel = compare(store=None, model=example["model"], workload=example["workload"], technique=name)
    assert name in panel.technique.options and set(panel.param_widgets) == set(cls.params)


def test_speculative_release_restores_the_draft_config(quick_zoo):
    spec = spec_from_example("speculative", techniques.get("speculative").examples[0])
    target, draft = load_model(spec.model), load_model(spec.technique.draft)
    saved = copy.deepcopy(draft.model.generation_config.to_dict())
    technique = techniques.get("speculative")(implementation="hf", num_assistant_tokens=7)
    spec = dataclasses.replace(spec, technique=TechniqueSpec("speculative", {"implementation": "hf",
                                                                             "num_assistant_tokens": 7},
                                                             spec.technique.draft))
    technique.prepare(runner.build_trial(runner.plan(spec), model=target, draft=draft))
    assert draft.model.generation_config.num_assistant_tokens == 7
    technique.release()
    assert draft.model.generation_config.to_dict() == saved


def test_speculative_is_lossless_on_the_zoo(quick_zoo):
    spec = spec_from_example("speculative", techniques.get("speculative").examples[0])
    result = runner.run(spec, progress=False)
    assert result.quality["exact_match_rate"] == 1.0
    assert result.internals["technique"]["target_forward_passes"] > 0
    rows = result.outputs
    assert all(row["baseline_tokens"] == row["technique_tokens"] for row in rows)


def test_unknown_technique_lists_valid_names():
    with pytest.raises(UnknownTechniqueError) as err:
        techniques.get("speculativ")
    message = str(err.value)
    assert "did you mean 'speculative'" in message and "baseline" in message


def test_speculative_why_not_before_loading(quick_zoo):
    spec = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", batch_size=2),
                   TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")))
    with pytest.raises(NotApplicableError, match="batch size 1"):
        runner.plan(spec)
    no_draft = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts"), TechniqueSpec("speculative"))
    with pytest.raises(NotApplicableError, match="--draft"):
        runner.plan(no_draft)
    on_classifier = RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets"),
                            TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")))
    with pytest.raises(NotApplicableError, match="classifier"):
        runner.plan(on_classifier)


def test_meta_display_and_figures_know_no_technique_by_name():
    """They read the typed report and Technique.features; only the reference ("baseline") is named."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "workbench"
    files = [*sorted((root / "meta").glob("*.py")), root / "display.py", root / "widgets" / "figures.py"]
    found = [f"{path.relative_to(root)}: {name}" for path in files for name in techniques.names()
             if name != "baseline" and name in path.read_text(encoding="utf-8")]
    assert found == []
