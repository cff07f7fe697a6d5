"""The tiny model zoo: a quick build loads with the real HF / diffusers classes and behaves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import datasets
from workbench.models import zoo
from workbench.models.zoo import builder as zoo_build
from workbench.models.zoo import catalogue as zoo_catalogue
from workbench.models.zoo import trainers as zoo_trainers
from workbench.models.digits import DigitJudge, DigitsPipeline


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A WORKBENCH_DATA folder holding a quick build of the whole zoo (built once per session)."""
    root = tmp_path_factory.mktemp("workbench-data")
    zoo.build(quick=True, root=root / "zoo", progress=False)
    return root


@pytest.fixture()
def zoo_root(data_root, monkeypatch) -> Path:
    monkeypatch.setenv("WORKBENCH_DATA", str(data_root))
    return data_root / "zoo"


def test_every_model_built_with_metadata(zoo_root):
    records = zoo.list_models()  # default root, via WORKBENCH_DATA
    assert [r.name for r in records] == list(zoo.DEFAULT_NAMES)  # the seed siblings only when named
    assert set(zoo.DEFAULT_NAMES) | set(zoo.EXTRA_NAMES) | set(zoo.PRETRAINED_NAMES) == set(zoo.ZOO_NAMES)
    for rec in records:
        folder = zoo.model_dir(rec.name)
        assert folder == zoo_root / rec.name
        meta = json.loads((folder / zoo.METADATA_FILE).read_text())
        assert meta["name"] == rec.name and meta["kind"] == zoo.MODELS[rec.name].kind
        assert rec.quick is True and rec.seed == zoo.DEFAULT_SEED
        assert rec.steps > 0 and np.isfinite(rec.final_loss) and rec.train_seconds > 0
        assert rec.parameter_count > 0 and rec.bytes > 0 and rec.data and rec.description
        assert rec.metrics and rec.config and rec.built_at
        assert {"torch", "transformers", "diffusers"} <= set(rec.versions)
    assert not list(zoo_root.glob(".building-*"))


def test_only_safetensors_weights(zoo_root):
    files = [p for p in zoo_root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_causal_lms_load_generate_and_pair(zoo_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    target = AutoModelForCausalLM.from_pretrained(zoo_root / "code-target").eval()
    draft = AutoModelForCausalLM.from_pretrained(zoo_root / "code-draft").eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_root / "code-target")
    assert isinstance(target, GPT2LMHeadModel) and isinstance(draft, GPT2LMHeadModel)
    assert target.config.n_layer > draft.config.n_layer
    assert AutoTokenizer.from_pretrained(zoo_root / "code-draft").get_vocab() == tokenizer.get_vocab()

    prompt = datasets.code_prompts(1)[0]
    ids = tokenizer(prompt, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == prompt  # byte-level BPE round-trips code exactly
    greedy = target.generate(**ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert greedy.shape == (1, ids["input_ids"].shape[1] + 8)
    # the pair works for transformers' assisted generation, and greedy stays lossless
    assisted = target.generate(**ids, assistant_model=draft, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(assisted, greedy)

    draft_rec = zoo.record("code-draft")
    assert {"greedy_agreement_on_target_outputs", "target_cost_ratio"} <= set(draft_rec.metrics)
    assert draft_rec.depends_on == {"code-target": zoo.record("code-target").built_at}


def test_classifier_loads_with_labels(zoo_root):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(zoo_root / "code-classifier").eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_root / "code-classifier")
    assert isinstance(model, BertForSequenceClassification)
    assert 4 <= model.config.num_hidden_layers <= 6
    assert [model.config.id2label[i] for i in range(model.config.num_labels)] == list(datasets.SNIPPET_LABELS)
    texts = [t for t, _ in datasets.code_snippets("test", n=6)]
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (6, len(datasets.SNIPPET_LABELS))
    assert "test_accuracy" in zoo.record("code-classifier").metrics


def test_diffusion_pipeline_shapes_steps_and_callback(zoo_root):
    from diffusers import DDIMScheduler, UNet2DModel

    pipe = DigitsPipeline.from_zoo_dir(zoo.model_dir("digits-diffusion"))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.unet.config.num_class_embeds == 10

    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        seen.append(step_index)
        assert callback_kwargs["latents"].shape == (3, 1, 8, 8)
        return callback_kwargs

    out = pipe([0, 5, 9], num_inference_steps=7, generator=torch.manual_seed(0), callback_on_step_end=callback)
    assert out.images.shape == (3, 8, 8, 1) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    assert seen == list(range(7)) and out.num_inference_steps_run == 7
    again = pipe([0, 5, 9], num_inference_steps=7, generator=torch.manual_seed(0)).images
    np.testing.assert_array_equal(out.images, again)
    assert pipe([1], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)


def test_diffusion_pipeline_interrupt_and_bad_input(zoo_root):
    pipe = DigitsPipeline.from_pretrained(str(zoo_root / "digits-diffusion"))
    pipe.set_progress_bar_config(disable=True)

    def stop_after_three(p, step_index, timestep, callback_kwargs):
        if step_index == 2:
            p._interrupt = True
        return {}

    out = pipe([4, 4], num_inference_steps=20, callback_on_step_end=stop_after_three,
               callback_on_step_end_tensor_inputs=["pred_original_sample"])
    assert out.num_inference_steps_run == 3 and out.images.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10])
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([1], num_inference_steps=0)


def test_judge_loads_and_predicts(zoo_root):
    judge = DigitJudge.from_pretrained(str(zoo.model_dir("digits-judge")))
    x_test, _ = datasets.digits("test")
    images = (x_test[:5].transpose(0, 2, 3, 1) + 1) / 2  # pipeline "np" convention
    assert judge.predict(images).shape == (5,)
    assert judge(torch.from_numpy(x_test[:5])).shape == (5, 10)
    with pytest.raises(ValueError, match="shape"):
        judge.predict(x_test[:5])
    assert "judge_accuracy_50_steps" in zoo.record("digits-diffusion").metrics


def test_rebuild_is_a_no_op(zoo_root):
    before = {r.name: r.built_at for r in zoo.list_models()}
    mtimes = {n: (zoo_root / n / zoo.METADATA_FILE).stat().st_mtime_ns for n in zoo.DEFAULT_NAMES}
    records = zoo.build(quick=True, progress=False)
    assert {r.name: r.built_at for r in records} == before
    assert {n: (zoo_root / n / zoo.METADATA_FILE).stat().st_mtime_ns for n in zoo.DEFAULT_NAMES} == mtimes


def test_force_rebuilds_the_model_and_its_dependents(data_root, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(data_root / "zoo", root)
    abandoned = root / ".building-digits-judge-999999999-x1y2"  # left by a killed build (no such pid)
    (abandoned / "unet").mkdir(parents=True)
    before = {r.name: r.built_at for r in zoo.list_models(root)}
    records = {r.name: r for r in zoo.build(quick=True, root=root, names=["digits-judge"], force=True, progress=False)}
    assert set(records) == {"digits-judge"}
    assert records["digits-judge"].built_at != before["digits-judge"]
    # digits-diffusion was evaluated with the old judge: stale now, so it is rebuilt on request
    rebuilt = zoo.build(quick=True, root=root, names=["digits-diffusion"], progress=False)[-1]
    assert rebuilt.built_at != before["digits-diffusion"]
    assert rebuilt.depends_on == {"digits-judge": records["digits-judge"].built_at}
    assert zoo.record("code-target", root).built_at == before["code-target"]
    assert not abandoned.exists()


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    ctx = zoo_build._BuildContext(quick=True, seed=0, root=tmp_path, progress=False,
                                  recipes=zoo_catalogue._recipes(True))
    bad = zoo.LMRecipe(n_layer=3, n_embd=16, n_head=2, steps=1, grow_from=2)  # 3 is no multiple of 2
    ctx.recipes["code-target"] = bad
    with pytest.raises(ValueError, match="multiple"):
        zoo_build._build_one("code-target", ctx, deps={})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(zoo.ZooError, match="not built"):
        zoo.model_dir("code-target", tmp_path)


def test_unknown_and_missing_names_explain_the_fix(tmp_path):
    with pytest.raises(zoo.ZooError) as unknown:
        zoo.model_dir("gpt-17", tmp_path)
    message = str(unknown.value)
    assert "gpt-17" in message and "code-target" in message and "\n" not in message
    with pytest.raises(zoo.ZooError) as missing:
        zoo.model_dir("digits-judge", tmp_path)
    message = str(missing.value)
    assert "workbench zoo build" in message and "--quick" in message and "\n" not in message
    with pytest.raises(zoo.ZooError, match="valid names"):
        zoo.build(quick=True, root=tmp_path, names=["nope"])
    assert zoo.list_models(tmp_path) == []


def test_up_to_date_rules():
    rec = zoo.ZooRecord(name="digits-judge", kind="judge", path="/x", quick=False, seed=0, description="",
                        data="", steps=1, final_loss=0.0, train_seconds=1.0, parameter_count=1, bytes=1)
    assert zoo_build._up_to_date(rec, quick=False, seed=0, deps={})
    assert zoo_build._up_to_date(rec, quick=True, seed=0, deps={})  # a full model serves a quick request
    assert not zoo_build._up_to_date(rec, quick=False, seed=1, deps={})
    assert not zoo_build._up_to_date(rec, quick=False, seed=0, deps={"digits-judge": "another build"})
    quick_rec = zoo.ZooRecord(**{**rec.to_dict(), "quick": True})
    assert not zoo_build._up_to_date(quick_rec, quick=False, seed=0, deps={})  # a full request replaces it


def test_depth_growth_preserves_the_function():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    grown = zoo_trainers._grow_depth(model, 6).eval()
    assert grown.config.n_layer == 6
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits)
    assert grown.lm_head.weight.data_ptr() == grown.transformer.wte.weight.data_ptr()


def test_seed_siblings_build_when_named(tmp_path):
    from transformers import AutoConfig

    records = zoo.build(quick=True, root=tmp_path / "zoo", names=list(zoo.EXTRA_NAMES), progress=False)
    assert [r.name for r in records] == list(zoo.EXTRA_NAMES)  # no dependencies, nothing else built
    tall, mid = (AutoConfig.from_pretrained(tmp_path / "zoo" / n) for n in ("code-tall", "code-mid"))
    assert tall.n_layer > mid.n_layer and tall.n_embd < mid.n_embd  # deep-narrow vs shallow-wide siblings
    deep = AutoConfig.from_pretrained(tmp_path / "zoo" / "code-classifier-deep")
    assert deep.model_type == "bert" and deep.num_hidden_layers == 4  # the quick recipe
