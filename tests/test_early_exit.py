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
    assert report["exit_pooling"]["pooling"] == "first"  # auto, and the quick zoo's BERT has no pooling config
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
    from workbench.techniques._layers import decoder_stack

    assert_exact_cache(decoder_stack(causal_lm.model), torch.tensor([[5, 17, 42, 9]]))


def calm_generate_steps(stack, ids):
    """Decode 4 tokens exiting after layer 1 for three, then a full-depth token; return tokens and cache."""
    cache = stack.new_cache()
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


def full_cache(model, ids):
    """The full model's own cache after a forward over ``ids`` (a plain cache that keeps every key)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache


def assert_cache_matches(cache, reference, lengths=None):
    """Layer by layer, every cached key/value equals the full model's (its first ``lengths[i]`` tokens)."""
    assert len(cache.layers) == len(reference.layers)
    for index, (mine, full) in enumerate(zip(cache.layers, reference.layers, strict=True)):
        length = mine.keys.shape[-2]
        assert lengths is None or length == lengths[index]
        assert torch.allclose(mine.keys, full.keys[..., :length, :], atol=1e-5), f"layer {index} keys"
        assert torch.allclose(mine.values, full.values[..., :length, :], atol=1e-5), f"layer {index} values"


def assert_exact_cache(stack, ids):
    # 1. Three tokens exit after layer 1, then a full-depth token: the deeper layers catch up on four
    # tokens in one call (rotary positions past .. past+3 there), and every entry is the full model's.
    out = calm_generate_steps(stack, ids)
    sequence = torch.cat([ids, torch.tensor([out["tokens"][:-1]])], 1)
    assert_cache_matches(out["cache"], full_cache(stack.model, sequence),
                         [sequence.shape[1]] * stack.num_layers)
    # 2. calm_generate exiting every token after layer 1: the deeper layers' entries lag (the prompt only)
    # and what is there is still the full model's.
    from workbench.techniques.early_exit import calm_generate

    cache = stack.new_cache()
    decoded = calm_generate(stack, ids, 5, 0.0, frozenset({1}), None, cache=cache)
    assert decoded["exit_layers"] == [stack.num_layers, 1, 1, 1, 1]
    sequence = torch.cat([ids, torch.tensor([decoded["tokens"][:-1]])], 1)
    assert_cache_matches(cache, full_cache(stack.model, sequence),
                         [sequence.shape[1]] + [ids.shape[1]] * (stack.num_layers - 1))


# -- causal LMs of the Llama layout (rotary positions): tiny random seeded models ----------------------

_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny_decoder(family: str):
    """A tiny seeded random causal LM of ``family``; Mistral with a 5-token sliding window, so the
    window cuts in (prompt 4 + up to 8 new tokens)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
               "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
               "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
               "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 2})}
    config_name, model_name, extra = classes[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**_TINY, **extra, architectures=[model_name])
    return getattr(transformers, model_name)(config).eval()


ROTARY_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3")


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_rotary_lm_never_exiting_equals_greedy_generate(family):
    from workbench.techniques._layers import decoder_stack
    from workbench.techniques.early_exit import calm_generate

    model = tiny_decoder(family)
    stack = decoder_stack(model)
    assert stack.layout == "rotary"
    ids = torch.tensor([[5, 17, 42, 9]])
    out = calm_generate(stack, ids, 8, 1.0, frozenset({1, 2, 3}), None)
    with torch.inference_mode():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert out["tokens"] == greedy[0, ids.shape[1]:].tolist()
    assert out["exit_layers"] == [stack.num_layers] * 8


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_rotary_lm_exited_tokens_get_exact_cache_entries(family):
    from workbench.techniques._layers import decoder_stack

    assert_exact_cache(decoder_stack(tiny_decoder(family)), torch.tensor([[5, 17, 42, 9]]))


@pytest.mark.parametrize("family", ("llama", "gemma"))
def test_rotary_lm_exit_logits_take_the_exit_layers_distribution(family):
    """Teacher-forced: threshold 1.0 is the model's own logits; threshold 0 is layer k's through the
    final norm and head, as the stack computes it."""
    from workbench.techniques._layers import decoder_stack
    from workbench.techniques.early_exit import exit_logits

    model = tiny_decoder(family)
    stack = decoder_stack(model)
    ids = torch.tensor([[5, 17, 42, 9, 33, 61]])
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0]
        hidden, cache = stack.embed(ids, 0), stack.new_cache()
        for index in range(2):
            hidden = stack.layer(index, hidden, cache)
        layer2 = stack.logits(hidden[0])
    assert torch.allclose(exit_logits(stack, ids, 1.0, frozenset({2})), full, atol=1e-5)
    assert torch.allclose(exit_logits(stack, ids, 0.0, frozenset({2, 3})), layer2, atol=1e-5)


def test_rotary_lm_end_to_end_never_exiting_equals_the_baseline(quick_zoo, causal_lm):
    """The technique itself on a tiny Llama (prepare, curve, timed calls, teacher-forced quality)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{**_TINY, "vocab_size": len(causal_lm.tokenizer),
                                            "max_position_embeddings": 256})).eval()
    fake = LoadedModel(ModelSpec("zoo:code-target"), "causal_lm", llama, causal_lm.tokenizer, "cpu", "float32",
                       "-", {})
    trial = trial_for(lm_spec(), causal_lm)
    trial.model = fake
    technique = EarlyExit(threshold=1.0, thresholds="1.0", curve_repeats=1, quality_tokens=64)
    technique.prepare(trial)
    outs = [technique.run(b) for b in technique.batches_]
    assert [o.output for o in outs] == [technique._full(b).output for b in technique.batches_]
    report = technique.internals([o.internals for o in outs])
    assert report["mean_layers_executed"] == 4 and report["exit_check_layers"] == [1, 2, 3]
    assert report["text_quality"]["perplexity_change_percent"] == pytest.approx(0.0, abs=1e-6)


def config_facts(tmp_path, config):
    from workbench.models.facts import read_facts
    from workbench.techniques.base import Facts

    config.save_pretrained(tmp_path)
    return Facts(read_facts(ModelSpec(str(tmp_path))), None, "cpu", 4)


@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_check_accepts_the_supported_decoder_families_from_config_alone(tmp_path, family):
    facts = config_facts(tmp_path, tiny_decoder(family).config)
    assert facts.model.kind == "causal_lm" and facts.model.family == family
    assert EarlyExit().check(facts, lm_spec()) is None


def test_check_refuses_other_decoders_naming_the_architecture(tmp_path):
    from transformers import GPTNeoXConfig, LlamaConfig, OPTConfig

    for name, config in (("GPTNeoXForCausalLM", GPTNeoXConfig(architectures=["GPTNeoXForCausalLM"])),
                         ("OPTForCausalLM", OPTConfig(architectures=["OPTForCausalLM"]))):
        reason = EarlyExit().check(config_facts(tmp_path / name, config), lm_spec())
        assert name in reason and "llama" in reason and "\n" not in reason
    # a rope that rescales with the sequence length cannot keep a lagging layer's keys exact
    dynamic = LlamaConfig(**_TINY, architectures=["LlamaForCausalLM"],
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    reason = EarlyExit().check(config_facts(tmp_path / "dynamic", dynamic), lm_spec())
    assert "LlamaForCausalLM" in reason and "'dynamic'" in reason


def test_lm_unsupported_architecture_and_batch_size(quick_zoo, causal_lm):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2)).eval()
    fake = LoadedModel(ModelSpec("zoo:code-target"), "causal_lm", neox, causal_lm.tokenizer, "cpu", "float32",
                       "-", {})
    trial = trial_for(lm_spec(), causal_lm)
    trial.model = fake
    with pytest.raises(NotApplicableError, match="GPTNeoXForCausalLM"):  # the layer stack's own refusal, too
        EarlyExit().prepare(trial)
    batched = RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", batch_size=2),
                      TechniqueSpec("early_exit"))
    with pytest.raises(NotApplicableError, match="batch_size=1"):
        runner.plan(batched)


# -- encoders: other families, and heads that pool as the model pools ------------------------------


def tiny_encoder(family: str):
    import transformers

    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 num_labels=3)
    configs = {"bert": ("BertConfig", small), "roberta": ("RobertaConfig", small),
               "electra": ("ElectraConfig", {**small, "embedding_size": 16}),  # embeddings_project 16 -> 32
               "distilbert": ("DistilBertConfig", dict(vocab_size=64, dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                                       num_labels=3)),
               "albert": ("AlbertConfig", {**small, "embedding_size": 16})}
    name, kwargs = configs[family]
    model_class = name.replace("Config", "ForSequenceClassification")
    torch.manual_seed(0)
    config = getattr(transformers, name)(**kwargs, architectures=[model_class])
    return getattr(transformers, model_class)(config).eval()


PADDED = {"input_ids": torch.tensor([[3, 7, 8, 9, 4], [3, 7, 5, 1, 1]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}


@pytest.mark.parametrize("family", ("bert", "roberta", "electra", "distilbert"))
def test_encoder_families_reproduce_their_logits_layer_by_layer(tmp_path, family):
    from workbench.techniques._layers import classifier_stack

    model = tiny_encoder(family)
    stack = classifier_stack(model, PADDED)  # checks embed -> blocks -> head against the model on padded rows
    assert stack.num_layers == 3
    assert EarlyExit().check(config_facts(tmp_path, model.config), classifier_spec()) is None


def test_albert_is_refused_at_plan_time_and_by_the_stack(tmp_path):
    from workbench.techniques._layers import classifier_stack

    model = tiny_encoder("albert")
    reason = EarlyExit().check(config_facts(tmp_path, model.config), classifier_spec())
    assert "AlbertForSequenceClassification" in reason and "shared block" in reason and "\n" not in reason
    with pytest.raises(NotApplicableError, match="AlbertForSequenceClassification"):
        classifier_stack(model, PADDED)


def test_mean_pooling_ignores_padding_and_is_read_from_the_sentence_transformers_config(tmp_path):
    from workbench.techniques.early_exit import exit_pooling, pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    pooled = pool(hidden.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(1e6)), mask, "mean")
    assert torch.allclose(pooled[0], hidden[0].mean(0)) and torch.allclose(pooled[1], hidden[1, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "first"), hidden[:, 0])
    # decided from the model's files: a sentence encoder's pooling config, else the head's first token
    assert exit_pooling(str(tmp_path), "bert")["pooling"] == "first"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False,
                                                                    "pooling_mode_mean_tokens": True}))
    decided = exit_pooling(str(tmp_path), "bert")
    assert decided["pooling"] == "mean" and "1_Pooling/config.json" in decided["decided_by"]
    assert exit_pooling(str(tmp_path), "bert", "first")["pooling"] == "first"  # the parameter overrides


def test_mean_pooled_heads_exit_and_never_exiting_still_reproduces(classifier):
    never = prepared(classifier, threshold=1.0, pooling="mean")
    for batch in never.batches_:
        assert never.run(batch).output == classify(classifier.model, batch).output
    always = prepared(classifier, threshold=0.0, pooling="mean")
    calls = [always.run(b).internals for b in always.batches_]
    report = always.internals(calls)
    assert report["mean_layers_executed"] == 1.0
    assert report["exit_pooling"] == {"pooling": "mean", "decided_by": "the pooling=mean parameter"}
    assert never._pooled_features(never.batches_[:1]).shape == (4, 3, classifier.model.config.hidden_size)
