"""Techniques refuse what cannot apply at plan time, from the model files alone: no weight is loaded, one
line, exit 2 for `workbench run`, a *skipped* row in a sweep that `--resume` never retries. And one model
is one identity, however its folder is typed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workbench import runner
from workbench.errors import NotApplicableError
from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def neox_folder(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, randomly initialised) GPTNeoXForCausalLM saved with save_pretrained, with the zoo's tokenizer:
    an architecture early exit does not drive (it drives GPT-2 and the Llama layout)."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path_factory.mktemp("tiny-neox")
    tokenizer = AutoTokenizer.from_pretrained(quick_zoo / "code-target")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=256)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_tokenizer_draft(quick_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo draft's weights beside a tokenizer trained on other text: a draft of another family."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("other-tokenizer-draft")
    for path in (quick_zoo / "code-draft").iterdir():
        if path.suffix in (".safetensors", ".json") and "token" not in path.name:
            shutil.copy(path, folder / path.name)
    tokenizer = AutoTokenizer.from_pretrained(quick_zoo / "code-draft")
    tokenizer.train_new_from_iterator(["completely different text"] * 20, vocab_size=280).save_pretrained(folder)
    return folder


def early_exit_on(folder: Path) -> RunSpec:
    return RunSpec(ModelSpec(str(folder)), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                   TechniqueSpec("early_exit"), repeats=1)


def speculative_with(draft: Path) -> RunSpec:
    return RunSpec(ModelSpec("zoo:code-target"), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                   TechniqueSpec("speculative", {"num_assistant_tokens": 2}, ModelSpec(str(draft))), repeats=1)


@pytest.fixture
def no_weights_may_load(monkeypatch: pytest.MonkeyPatch):
    """Any weight load fails the test: the workbench's loader, transformers' and diffusers' from_pretrained."""
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded at plan time")

    monkeypatch.setattr(runner, "load_model", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(refuse))


def test_refused_before_any_weight_loads(neox_folder, other_tokenizer_draft, no_weights_may_load):
    with pytest.raises(NotApplicableError, match="Llama-layout") as err:
        runner.plan(early_exit_on(neox_folder))
    assert "GPTNeoXForCausalLM" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NotApplicableError, match="different tokenizer") as err:
        runner.plan(speculative_with(other_tokenizer_draft))
    assert "same vocabulary" in str(err.value) and "\n" not in str(err.value)


def test_a_pickle_only_folder_is_refused_at_plan_time(quick_zoo, tmp_path, no_weights_may_load):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(quick_zoo / "code-draft" / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read: refused before loading")
    spec = RunSpec(ModelSpec(str(folder)), WorkloadSpec("code-prompts", max_items=2), TechniqueSpec("baseline"))
    with pytest.raises(NotApplicableError, match="pickle-based weights"):
        runner.plan(spec)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.sys.executable, "-m", "workbench.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_run_exits_2_and_a_sweep_stores_skipped_rows_that_resume_never_retries(
        neox_folder, other_tokenizer_draft, cli_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    # 1. `workbench run`: one line, exit 2, nothing stored.
    for args in (["--model", str(neox_folder), "--technique", "early_exit"],
                 ["--model", "zoo:code-target", "--technique", "speculative", "--draft", str(other_tokenizer_draft)]):
        done = _cli(cli_env, "run", *args, "--workload", "code-prompts", "--max-items", "2", "--repeats", "1",
                    "--store", url)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert Store(url).count() == 0
    # 2. A sweep: both stored as skipped with their reasons, the applicable run ok.
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
models: ["{neox_folder}", zoo:code-target]
workloads: [{{name: code-prompts, max_items: 2, max_new_tokens: 4}}]
techniques:
  - {{name: early_exit, params: {{thresholds: "0.5", curve_repeats: 1}}}}
  - {{name: speculative, draft: "{other_tokenizer_draft}", params: {{num_assistant_tokens: 2}}}}
repeats: 1
""")
    done = _cli(cli_env, "sweep", str(sweep), "--store", url, "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = Store(url).runs()
    by_status = runs.groupby("status").size().to_dict()
    assert by_status == {"ok": 1, "skipped": 3}, runs[["model", "technique", "status", "failure_reason"]]
    reasons = " ".join(runs["failure_reason"].dropna())
    assert "Llama-layout" in reasons and "different tokenizer" in reasons
    # 3. --resume: nothing is retried.
    done = _cli(cli_env, "sweep", str(sweep), "--store", url, "--resume", "--quiet")
    assert done.returncode == 0 and "0 ok, 0 failed, 0 skipped, 4 already stored" in done.stdout, done.stdout
    assert Store(url).count() == 4


def test_one_model_is_one_identity_however_it_is_typed(quick_zoo, tmp_path):
    from workbench.models.facts import read_facts

    zoo_name = read_facts(ModelSpec("zoo:code-draft"))
    by_path = read_facts(ModelSpec(str(quick_zoo / "code-draft")))
    relative = read_facts(ModelSpec(os.path.relpath(quick_zoo / "code-draft") + "/"))
    assert zoo_name.name == by_path.name == relative.name == "zoo:code-draft"
    copy = tmp_path / "copy-of-draft"
    shutil.copytree(quick_zoo / "code-draft", copy)
    copied = read_facts(ModelSpec(str(copy)))
    assert copied.name == str(copy.resolve()) and copied.digest == zoo_name.digest
    other = read_facts(ModelSpec("zoo:code-target"))
    assert other.digest != zoo_name.digest
    # the meta-learner counts the copy as the same model
    from workbench.meta import features

    rows = []
    for spec_model in ("zoo:code-draft", str(copy)):
        spec = RunSpec(ModelSpec(spec_model), WorkloadSpec("code-prompts", max_items=2, max_new_tokens=4),
                       TechniqueSpec("quantization"), repeats=2, threads=1)  # threads are in the context: pinned,
        rows.append(runner.run(spec, progress=False).to_row())  # not left to what other tests leave free
    import pandas as pd

    table = features.run_features(pd.DataFrame(rows))
    assert table["model"].nunique() == 1 and table["context"].nunique() == 1
