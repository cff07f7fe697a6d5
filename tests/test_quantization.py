"""Quantization: every linear-like layer really quantized (GPT-2's Conv1D included), smaller models,
quality beside speed, GPU-only or missing-library variants skipped with a reason, combined variants."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workbench.errors import NotApplicableError
from workbench.models.loading import load_model
from workbench.runner import execute, plan
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import Store
from workbench.sweep import run_sweep
from workbench.techniques._quantize import conv1d_to_linear, quantize_copy


@pytest.fixture(scope="module")
def target(quick_zoo: Path):
    return load_model(ModelSpec("zoo:code-target"))


def _spec(scheme: str, model: str = "zoo:code-target", workload: str = "code-prompts", device: str = "cpu",
          technique: str = "quantization", **params) -> RunSpec:
    params = {"scheme": scheme, **params} if technique == "quantization" else params
    draft = params.pop("draft", None)
    return RunSpec(ModelSpec(model), WorkloadSpec(workload, max_items=2, max_new_tokens=8),
                   TechniqueSpec(technique, params, ModelSpec(draft) if draft else None), device=device,
                   repeats=1, warmup=0)


def test_plain_dynamic_quantization_skips_gpt2_conv1d_which_is_why_we_convert(target):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = quantize_dynamic(target.model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    quantized = [n for n, m in plain.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                 and not n.endswith("_packed_params")]
    assert quantized == ["lm_head"]  # the silent skip: only the LM head
    assert any(isinstance(m, Conv1D) for m in plain.modules())


def test_conv1d_conversion_computes_the_same_function(target):
    import copy

    converted = copy.deepcopy(target.model)
    count = conv1d_to_linear(converted)
    assert count == sum(isinstance(m, Conv1D) for m in target.model.modules()) > 0
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    ids = target.tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(converted(input_ids=ids).logits, target.model(input_ids=ids).logits)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp16", "bf16"])
def test_every_linear_like_layer_reported_quantized_really_is(target, scheme):
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    quantized, report = quantize_copy(target.model, scheme)
    assert report["linear_layers"] == report["conv1d_converted_to_linear"] + 1  # + the LM head
    assert report["quantized_layers"] == report["linear_layers"] and report["not_quantized"] == []
    assert report["bytes_after"] < report["bytes_before"]
    modules = dict(quantized.named_modules())
    for name in [n for n, m in target.model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]:
        module = modules[name]
        if scheme == "int8-dynamic":
            assert isinstance(module, torch.ao.nn.quantized.dynamic.Linear), name
            assert module.weight().dtype == torch.qint8
        else:
            assert module.weight.dtype == (torch.float16 if scheme == "fp16" else torch.bfloat16), name
    # The shared model is untouched: same tensors, Conv1D still in place.
    assert all(torch.equal(v, before[k]) for k, v in target.model.state_dict().items())
    assert any(isinstance(m, Conv1D) for m in target.model.modules())


def test_gpu_only_and_missing_library_variants_fail_plan_with_a_reason(quick_zoo):
    with pytest.raises(NotApplicableError, match="needs a CUDA GPU"):
        plan(_spec("bnb-int8"))
    with pytest.raises(NotApplicableError, match="needs a CUDA GPU"):
        plan(_spec("int4-weight-only"))
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(NotApplicableError, match="pip install torchao"):
            plan(_spec("int8-weight-only"))


def test_a_sweep_skips_inapplicable_variants_and_runs_the_rest(quick_zoo, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'runs.sqlite'}")
    outcome = run_sweep([_spec("bnb-nf4"), _spec("int8-dynamic")], store, progress=False)
    assert (outcome.skipped, outcome.ok) == (1, 1)
    stored = store.runs()
    assert list(stored["status"]) == ["skipped", "ok"]
    assert "needs a CUDA GPU" in stored["failure_reason"][0]


def test_lm_run_reports_perplexity_kl_and_bytes_beside_speed(quick_zoo):
    result = execute(plan(_spec("int8-dynamic")), progress=False)
    assert result.status == "ok", result.failure_reason
    q = result.quality
    assert q["perplexity_baseline"] > 1 and q["perplexity_technique"] > 1
    assert q["perplexity_change_percent"] == pytest.approx(
        100 * (q["perplexity_technique"] / q["perplexity_baseline"] - 1))
    assert q["next_token_kl_mean"] >= 0 and q["quality_text_tokens"] > 0
    tech = result.internals["technique"]
    assert tech["library"].startswith("torch.ao") and tech["bytes_after"] < tech["bytes_before"]
    resources = result.resources
    assert resources["quantization"]["model_bytes"] == tech["bytes_after"] < resources["baseline"]["model_bytes"]
    assert result.report["model_bytes"] == tech["bytes_after"]
    assert result.comparison["speedup"] > 0 and result.comparison["basis"] == "time per output token"
    # the quality a user reads and a budget judges is perplexity and KL, never token agreement "points"
    from workbench.display import quality_text, run_text
    from workbench.quality import quality_loss

    shown = quality_text(result.quality, result.quality_metrics, result.report["lossless"])
    assert "perplexity change" in shown and "next-token KL" in shown and "token agreement" not in shown
    assert "token agreement" not in run_text(result) and "points" not in run_text(result)
    assert quality_loss(result.quality, "text-generation", lossless=False) == pytest.approx(
        q["perplexity_change_percent"], abs=1e-6)


def test_classifier_run_reports_accuracy_and_label_kl(quick_zoo):
    result = execute(plan(_spec("int8-dynamic", model="zoo:code-classifier", workload="code-snippets")),
                     progress=False)
    assert result.status == "ok", result.failure_reason
    assert "accuracy_change_points" in result.quality and result.quality["label_kl_mean"] >= 0


def test_combined_variants_quantized_draft_and_quantized_early_exit(quick_zoo):
    spec = _spec("", technique="speculative", draft="zoo:code-draft", draft_quantization="int8-dynamic")
    result = execute(plan(spec), progress=False)
    assert result.status == "ok", result.failure_reason
    assert result.quality["exact_match_rate"] == 1.0  # a quantized draft changes speed, never greedy output
    assert result.internals["technique"]["draft_quantization"]["quantized_layers"] > 0
    spec = _spec("", technique="early_exit", model="zoo:code-classifier", workload="code-snippets",
                 quantization="int8-dynamic")
    result = execute(plan(spec), progress=False)
    assert result.status == "ok", result.failure_reason
    assert result.internals["technique"]["quantization"]["scheme"] == "int8-dynamic"


def test_cli_acceptance_command_reports_speed_and_quality(quick_zoo, workbench_cmd, cli_env):
    done = subprocess.run([*workbench_cmd, "run", "--technique", "quantization", "--param", "scheme=int8-dynamic",
                           "--model", "zoo:code-target", "--workload", "code-prompts", "--max-items", "2",
                           "--max-new-tokens", "8", "--repeats", "2", "--json"],
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["speedup"] > 0 and report["speedup_ci_low"] is not None
    assert "perplexity_change_percent" in report["quality"]
    done = subprocess.run([*workbench_cmd, "run", "--technique", "quantization", "--param", "scheme=bnb-int8",
                           "--model", "zoo:code-target", "--workload", "code-prompts"],
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "needs a CUDA GPU" in done.stderr


# ----------------------------------------------------------------------------------------------------
# mixed precision: layers kept float, by name or by the sensitivity search
# ----------------------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0, outlier_layer: int | None = None) -> nn.Module:
    """A seeded 3-layer Llama; with ``outlier_layer``, one intermediate channel of that layer's MLP gets a
    +1000 up_proj bias (biases stay float under dynamic int8) and a 1000x smaller down_proj column: that
    down_proj's per-tensor int8 input scale is then set by the outlier and crushes every other channel,
    while no quantized *weight* gets an outlier. Only that one layer is sensitive."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, mlp_bias=True, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    if outlier_layer is not None:
        mlp = model.model.layers[outlier_layer].mlp
        with torch.no_grad():
            mlp.up_proj.bias[5] = 1000.0
            mlp.down_proj.weight[:, 5] /= 1000.0
    return model


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("make, keep", [
    (_tiny_gpt2, {"lm_head", "transformer.h.1.mlp.c_proj"}),  # Conv1D converted, then kept float
    (_tiny_llama, {"lm_head", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"}),
])
def test_layers_kept_float_really_stay_float_nn_linear(make, keep):
    model = make()
    quantized, report = quantize_copy(model, "int8-dynamic", keep_float=keep)
    modules = dict(quantized.named_modules())
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    for name in names:
        if name in keep:
            assert type(modules[name]) is nn.Linear and modules[name].weight.dtype == torch.float32, name
        else:
            assert isinstance(modules[name], torch.ao.nn.quantized.dynamic.Linear), name
    assert sorted(report["kept_float"]) == sorted(keep) and report["not_quantized"] == []
    assert report["quantized_layers"] == report["linear_layers"] - len(keep) == len(names) - len(keep)
    # The float layers compute what the original's do: keeping everything float changes nothing.
    everything, report = quantize_copy(model, "int8-dynamic", keep_float=set(names))
    assert report["quantized_layers"] == 0
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(everything(input_ids=ids).logits, model(input_ids=ids).logits)


def test_keep_float_patterns_and_bad_values_give_one_clear_line(quick_zoo):
    from workbench.techniques._quantize import match_layers
    from workbench.techniques.base import TechniqueParamError
    from workbench.techniques.quantization import Quantization

    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    assert match_layers(names, ["down_proj"]) == set(names[:2])
    assert match_layers(names, ["lm_head", "model.layers.1.*"]) == {"lm_head", *names[1:3]}
    with pytest.raises(ValueError, match="'down' matches no linear layer.*lm_head"):
        match_layers(names, ["down"])
    for bad, message in (("lm_head,,x", "empty item"), ("auto,lm_head", "mixes 'auto'")):
        with pytest.raises(TechniqueParamError, match=message) as caught:
            Quantization(keep_float=bad)
        assert "\n" not in str(caught.value) and repr(bad) in str(caught.value)
    with pytest.raises(TechniqueParamError, match="max_perplexity_change_percent"):
        Quantization(keep_float="auto", max_perplexity_change_percent=-1)
    with pytest.raises(ValueError, match="casts the whole model"):
        quantize_copy(_tiny_gpt2(), "bf16", keep_float={"lm_head"})
    # at plan time: whole-model casts, classifiers for auto
    with pytest.raises(NotApplicableError, match="casts the whole model"):
        plan(_spec("fp16", keep_float="lm_head"))
    with pytest.raises(NotApplicableError, match="keep_float=auto scans perplexity on causal LMs"):
        plan(_spec("int8-dynamic", model="zoo:code-classifier", workload="code-snippets", keep_float="auto"))
    # a pattern matching no layer of the loaded model: the run fails with that one line
    result = execute(plan(_spec("int8-dynamic", keep_float="lm_head,nosuchlayer")), progress=False)
    assert result.status == "failed" and "'nosuchlayer' matches no linear layer" in result.failure_reason
    assert "\n" not in result.failure_reason


def test_auto_keeps_exactly_the_one_sensitive_layer_float():
    from workbench.techniques._sensitivity import search_keep_float

    model = _tiny_llama(outlier_layer=1)
    torch.manual_seed(1)  # calibration text drawn from the float model itself: any damage raises perplexity
    with torch.inference_mode():
        ids = model.generate(torch.zeros(1, 1, dtype=torch.long), do_sample=True, top_k=0, top_p=1.0,
                             max_new_tokens=256, min_new_tokens=256, pad_token_id=0)[0]
    found = search_keep_float(model, "int8-dynamic", ids, window=128, max_perplexity_change_percent=1.0)
    sensitivity = found["per_group_perplexity_change_percent"]
    assert found["groups"] == len(sensitivity) == 3 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert max(sensitivity, key=sensitivity.get) == "model.layers.1.mlp.down_proj"
    # All quantized is over the budget; keeping that one layer float is within it, and nothing more is kept.
    steps = found["steps"]
    assert steps[0]["perplexity_change_percent"] > 1.0 >= steps[-1]["perplexity_change_percent"]
    assert found["keep_float"] == ["model.layers.1.mlp.down_proj"] and len(steps) == 2
    # Without the outlier, int8 is within the budget as it is: nothing kept float.
    plain = search_keep_float(_tiny_llama(), "int8-dynamic", ids, window=128, max_perplexity_change_percent=1.0)
    assert plain["keep_float"] == [] and len(plain["steps"]) == 1


def test_auto_through_the_runner_reports_the_scan_and_the_timed_curve(quick_zoo):
    # a zero budget: all-int8 exceeds it on the quick zoo LM, so the search keeps layers float and times a curve
    spec = _spec("int8-dynamic", keep_float="auto", max_perplexity_change_percent=0.0, curve_points=3)
    result = execute(plan(spec), progress=False)
    assert result.status == "ok", result.failure_reason
    tech = result.internals["technique"]
    search = tech["sensitivity_search"]
    assert len(search["per_group_perplexity_change_percent"]) == search["groups"] == tech["linear_layers"]
    steps = search["steps"]
    assert search["calibration_tokens"] > 0 and steps[0]["perplexity_change_percent"] > 0.0
    assert steps[-1]["perplexity_change_percent"] <= 0.0 and len(steps) >= 2
    # the curve: greedy steps timed against float, the operating point within the budget, what stayed float listed
    curve, point = search["curve"], search["operating_point"]
    assert len(curve) >= 2 and curve[0]["kept_float"] == 0
    assert all(p["speedup_vs_float"] > 0 and p["speedup_ci_low"] is not None for p in curve)
    assert point["perplexity_change_percent"] <= 0.0 and point["kept_float"] == len(tech["kept_float"])
    assert tech["kept_float"] == search["keep_float"] and tech["quantized_layers"] == \
        tech["linear_layers"] - len(tech["kept_float"])
    assert "kept float (auto" in result.report["headline"]
    # the quality reported is the timed inputs' text, as without the search
    assert result.quality["quality_text_tokens"] > 0 and "perplexity_change_percent" in result.quality
