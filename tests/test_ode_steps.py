"""ode_steps: a parameter-shared model's one layer run fewer times with larger steps, on the quick zoo's
code-shared (GPT-2, one block's weights saved as identical copies) and on a tiny random ALBERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as hf

from workbench import runner
from workbench.errors import NotApplicableError
from workbench.models import zoo
from workbench.models.loading import load_model
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.techniques.ode_steps import OdeSteps, blocks_identical, ode_copy

PROMPT = "def parse_header(self, line):\n    "


def _spec(model: str, workload: str = "code-prompts", **params) -> RunSpec:
    return RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=2, max_new_tokens=6),
                   TechniqueSpec("ode_steps", params), repeats=1, warmup=0)


def _count_calls(modules) -> tuple[list[int], list]:
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in modules]
    return calls, handles


@pytest.fixture(scope="module")
def shared(quick_zoo: Path):
    return load_model(ModelSpec("zoo:code-shared"))


def test_the_zoo_model_really_shares_one_block(shared, quick_zoo):
    config = json.loads((quick_zoo / "code-shared" / "config.json").read_text())
    assert config["parameter_shared"] is True and config["ode_pretraining"] == "random-steps"
    assert config["shared_iterations"] == config["n_layer"] == len(shared.model.transformer.h) >= 4
    assert isinstance(shared.model, hf.GPT2LMHeadModel) and blocks_identical(shared.model)
    # the trick's trainer drew several iteration counts (the plain sibling's test below draws one)
    drawn = zoo.record("code-shared").config["iterations_drawn"]
    assert len(drawn) > 1 and sum(drawn.values()) == zoo.record("code-shared").steps


def test_full_steps_equal_the_model_and_fewer_run_fewer_blocks(shared):
    model, n = shared.model, len(shared.model.transformer.h)
    ids = shared.tokenizer(PROMPT, return_tensors="pt").input_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
        same, hooks = ode_copy(model, n)
        assert hooks is None and torch.equal(same(input_ids=ids).logits, reference)
        fewer, hooks = ode_copy(model, n // 2)
        calls, handles = _count_calls(fewer.transformer.h)
        logits = fewer(input_ids=ids).logits
        assert calls[0] == n // 2 and fewer.config.n_layer == n // 2 and hooks.h == 2.0
        assert torch.isfinite(logits).all() and not torch.equal(logits, reference)
        out = fewer.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=shared.tokenizer.pad_token_id)
        assert out.shape == (1, ids.shape[1] + 5)
    assert model.config.n_layer == n and len(model.transformer.h) == n
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refusals_name_the_architecture_and_the_valid_range(quick_zoo):
    with pytest.raises(NotApplicableError) as own_weights:
        runner.plan(_spec("zoo:code-target"))
    message = str(own_weights.value)
    assert "GPT2LMHeadModel's 4 layers each have their own weights" in message and "zoo:code-shared" in message
    with pytest.raises(NotApplicableError, match=r"steps=4 is outside 1 \.\. 3: GPT2LMHeadModel applies"):
        runner.plan(_spec("zoo:code-shared", steps=4))
    with pytest.raises(NotApplicableError, match="BertForSequenceClassification's 4 layers"):
        runner.plan(_spec("zoo:code-classifier", "code-snippets"))
    assert runner.plan(_spec("zoo:code-shared", steps=1)).technique.config["steps"] == 1
    assert OdeSteps.features({"steps": 0}, {"layers": 8}, None) == {"compute_fraction": 0.5}
    assert OdeSteps.display_name({"steps": 3}) == "ODE steps (3)"


def _albert(folder: Path, tokenizer, **extra) -> Path:
    torch.manual_seed(0)
    config = hf.AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=66, pad_token_id=1,
                             num_labels=6, **extra)
    hf.AlbertForSequenceClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_albert_is_accepted_and_runs_fewer_layer_calls(quick_zoo, tmp_path):
    tokenizer = hf.AutoTokenizer.from_pretrained(quick_zoo / "code-classifier")
    folder = _albert(tmp_path / "albert", tokenizer)
    grouped = _albert(tmp_path / "grouped", tokenizer, num_hidden_groups=2)
    with pytest.raises(NotApplicableError, match="AlbertForSequenceClassification has num_hidden_groups=2"):
        runner.plan(_spec(str(grouped), "code-snippets"))
    result = runner.run(_spec(str(folder), "code-snippets", steps=1), progress=False)
    assert result.status == "ok", result.failure_reason
    internals = result.internals["technique"]
    assert internals["steps_taken"] == 1 and internals["iterations_trained"] == 4 and internals["step_size_h"] == 4.0
    assert result.report["features"]["compute_fraction"] == 0.25 and "label_kl_mean" in result.quality
    # the copy: exact at N, M layer calls below it, and the loaded model keeps its config
    model = load_model(ModelSpec(str(folder))).model
    enc = tokenizer(["import os\nos.path.join(a, b)"], return_tensors="pt")
    layer = model.albert.encoder.albert_layer_groups[0].albert_layers[0]
    with torch.inference_mode():
        same, _ = ode_copy(model, 4)
        assert torch.equal(same(**enc).logits, model(**enc).logits)
        fewer, _ = ode_copy(model, 2)
        calls, handles = _count_calls([fewer.albert.encoder.albert_layer_groups[0].albert_layers[0]])
        assert torch.isfinite(fewer(**enc).logits).all() and calls[0] == 2
    assert model.config.num_hidden_layers == 4 and layer is not fewer.albert.encoder.albert_layer_groups[0].albert_layers[0]


def test_a_marked_gpt2_with_different_blocks_is_refused_in_prepare(quick_zoo, tmp_path):
    tokenizer = hf.AutoTokenizer.from_pretrained(quick_zoo / "code-target")
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=512)
    config.parameter_shared = True  # says so, but its two blocks were initialised apart
    hf.GPT2LMHeadModel(config).save_pretrained(tmp_path / "liar", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "liar")
    planned = runner.plan(_spec(str(tmp_path / "liar")))
    trial = runner.build_trial(planned, model=load_model(ModelSpec(str(tmp_path / "liar"))))
    with pytest.raises(NotApplicableError, match="blocks hold different weights"):
        planned.technique.prepare(trial)


def test_the_plain_sibling_is_trained_at_full_depth_only(quick_zoo, tmp_path):
    """Same recipe, data and seed; only the iteration counts drawn differ (the trick draws several)."""
    root = tmp_path / "zoo"
    plain = zoo.build(quick=True, root=root, names=["code-shared-plain"], progress=False)[0]
    trick = zoo.record("code-shared")
    assert plain.config["iterations_drawn"] == {str(plain.config["n_layer"]): plain.steps}
    assert plain.config["ode_pretraining"] == "none" and trick.config["ode_pretraining"] == "random-steps"
    assert {k: v for k, v in plain.config.items() if k not in ("train_iterations", "iterations_drawn",
                                                               "ode_pretraining")} == \
        {k: v for k, v in trick.config.items() if k not in ("train_iterations", "iterations_drawn", "ode_pretraining")}
    assert json.loads((root / "code-shared-plain" / "config.json").read_text())["ode_pretraining"] == "none"
