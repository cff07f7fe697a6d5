"""Hostile input (issue 20): broken model folders, workloads, stores and output paths, each through the CLI's
own entry point. Every case asserts the exit code, one line on stderr naming the bad value, no traceback,
and that what was stored or written before is unchanged.

The CLI runs in-process (``workbench.cli.main`` with ``sys.argv`` set) to keep the file fast; the exit
code, the streams and the files are the same as in a subprocess (one subprocess case checks a full disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from workbench.cli import main
from workbench.store import Store

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "data" / "seed" / "runs.parquet"
RUN = ["run", "--technique", "baseline", "--repeats", "1", "--warmup", "0", "--max-items", "2"]


def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``workbench ARGS``."""
    monkeypatch.setattr(sys, "argv", ["workbench", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def on_a_full_disk(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``workbench ARGS`` in a process that may write at most 100 kB per file: RLIMIT_FSIZE stands in for a
    full disk (a write past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
              f"sys.argv = ['workbench', *{list(args)!r}]; from workbench.cli import main; main()")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def kept_store(tmp_path: Path) -> tuple[str, Path]:
    """A store holding one run already: a bad input must leave it exactly as it was."""
    path = tmp_path / "kept.sqlite"
    with Store(f"sqlite:///{path}") as store:
        store.append({"spec_key": "k", "status": "ok", "model": "m", "workload": "w", "technique": "baseline",
                      "device": "cpu", "dtype": "float32", "seed": 0, "repeats": 1, "warmup": 0})
    return f"sqlite:///{path}", path


def broken_copy(quick_zoo: Path, tmp_path: Path, model: str) -> Path:
    folder = tmp_path / f"broken-{model}"
    shutil.copytree(quick_zoo / model, folder)
    return folder


# -- model folders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "is not valid JSON (Expecting property name"),
    (b'{"model_type": "\xff\xfe"}', "is not UTF-8 text"),
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"architectures": "GPT2LMHeadModel"}', "architectures='GPT2LMHeadModel', not a list of class names"),
])
def test_a_broken_config_json_is_one_line_at_plan_time(quick_zoo, tmp_path, kept_store, capsys, monkeypatch,
                                                         content, fragment):
    folder = broken_copy(quick_zoo, tmp_path, "code-classifier")
    (folder / "config.json").write_bytes(content)
    url, path = kept_store
    before = digest(path)
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", str(folder), "--workload", "code-snippets", "--store", url)
    one_error_line(code, err, "config.json", fragment)
    assert digest(path) == before


def test_a_folder_without_tokenizer_files_is_refused_at_plan_time(quick_zoo, tmp_path, kept_store, capsys,
                                                                  monkeypatch):
    folder = broken_copy(quick_zoo, tmp_path, "code-target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    url, path = kept_store
    before = digest(path)
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", str(folder), "--workload", "code-prompts", "--store", url)
    one_error_line(code, err, "has no readable tokenizer", "tokenizer.save_pretrained")
    assert digest(path) == before


def test_pickle_only_weights_exit_2_before_loading(quick_zoo, tmp_path, kept_store, capsys, monkeypatch):
    folder = broken_copy(quick_zoo, tmp_path, "code-classifier")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled: refused before loading")
    url, path = kept_store
    before = digest(path)
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", str(folder), "--workload", "code-snippets", "--store", url)
    one_error_line(code, err, "pickle-based weights", "allow_pickle=True")
    assert digest(path) == before


def test_a_pickled_unet_beside_a_decoy_safetensors_file_is_refused(quick_zoo, tmp_path, kept_store, capsys,
                                                                   monkeypatch):
    """Each component's own folder is judged: a safetensors file elsewhere does not make unet/ safe."""
    folder = broken_copy(quick_zoo, tmp_path, "digits-diffusion")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle would run code here")
    (folder / "decoy.safetensors").write_bytes(b"")
    url, path = kept_store
    before = digest(path)
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", str(folder), "--workload", "digits", "--store", url)
    one_error_line(code, err, "pickle-based weights")
    assert digest(path) == before


def test_a_pipeline_class_name_that_is_a_list_is_one_line(quick_zoo, tmp_path, capsys, monkeypatch):
    folder = broken_copy(quick_zoo, tmp_path, "digits-diffusion")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": ["DigitsPipeline"]}))
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", str(folder), "--workload", "digits",
                       "--store", f"sqlite:///{tmp_path / 's.sqlite'}")
    one_error_line(code, err, "model_index.json", "['DigitsPipeline'], not a class name")


# -- workloads against the model ------------------------------------------------------------------------


def test_new_tokens_beyond_the_position_limit_are_refused_with_the_room_left(quick_zoo, tmp_path, kept_store,
                                                                              capsys, monkeypatch):
    url, path = kept_store
    before = digest(path)
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", "zoo:code-target", "--workload", "code-prompts",
                       "--max-new-tokens", "100000", "--store", url)
    one_error_line(code, err, "position limit of 512", "lower --max-new-tokens to at most")
    assert digest(path) == before


def test_a_prompt_longer_than_the_position_limit_is_refused(quick_zoo, tmp_path, capsys, monkeypatch):
    workload = tmp_path / "long.jsonl"
    workload.write_text(json.dumps({"prompt": "x " * 3000}) + "\n")
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", "zoo:code-target", "--workload", str(workload),
                       "--max-new-tokens", "4", "--store", f"sqlite:///{tmp_path / 's.sqlite'}")
    one_error_line(code, err, "longest prompt (6000 tokens)", "shorten prompt 0")


@pytest.mark.parametrize("label, fragment", [(99, "has label 99, but model 'zoo:code-classifier' scores 6 labels"),
                                             (-1, "has label -1")])
def test_labels_outside_the_models_range_are_refused(quick_zoo, tmp_path, capsys, monkeypatch, label, fragment):
    workload = tmp_path / "labels.jsonl"
    workload.write_text(json.dumps({"text": "import os", "label": 0}) + "\n"
                        + json.dumps({"text": "import re", "label": label}) + "\n")
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", "zoo:code-classifier", "--workload", str(workload),
                       "--store", f"sqlite:///{tmp_path / 's.sqlite'}")
    one_error_line(code, err, "item 1", fragment)


def test_a_deeply_nested_workload_line_is_one_line(quick_zoo, tmp_path, capsys, monkeypatch):
    workload = tmp_path / "deep.jsonl"
    workload.write_text('{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    code, _, err = cli(capsys, monkeypatch, *RUN, "--model", "zoo:code-target", "--workload", str(workload),
                       "--store", f"sqlite:///{tmp_path / 's.sqlite'}")
    one_error_line(code, err, "deep.jsonl:1: JSON nested too deeply")


# -- stores and output files ------------------------------------------------------------------------------


@pytest.fixture
def seeded(tmp_path: Path, capsys, monkeypatch) -> tuple[str, Path]:
    path = tmp_path / "seed.sqlite"
    code, _, err = cli(capsys, monkeypatch, "import", str(SEED), "--store", f"sqlite:///{path}")
    assert code == 0, err
    return f"sqlite:///{path}", path


def test_one_damaged_row_is_skipped_and_named_and_the_rest_are_read(seeded, capsys, monkeypatch):
    url, path = seeded
    with sqlite3.connect(path) as conn:
        damaged = conn.execute("SELECT run_id FROM runs ORDER BY created_at LIMIT 1 OFFSET 3").fetchone()[0]
        conn.execute("UPDATE runs SET summary = '{broken' WHERE run_id = ?", (damaged,))
    conn.close()
    before = digest(path)
    code, out, err = cli(capsys, monkeypatch, "runs", "--store", url, "--format", "csv")
    assert code == 0 and "Traceback" not in err
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and damaged in warning[0]
    assert "skipped 1 damaged run(s)" in warning[0] and "column summary is not valid JSON" in warning[0]
    assert len(out.strip().splitlines()) == 1 + 199  # header + every other run
    assert digest(path) == before
    with pytest.raises(Exception, match=f"run '{damaged}' .* is damaged: its summary column"):
        Store(url).get(damaged)


def test_export_from_a_mistyped_store_leaves_the_bundle_and_creates_nothing(seeded, tmp_path, capsys, monkeypatch):
    url, _ = seeded
    bundle = tmp_path / "good.parquet"
    assert cli(capsys, monkeypatch, "export", "--store", url, "--out", str(bundle))[0] == 0
    before = digest(bundle)
    typo = tmp_path / "sede.sqlite"
    code, _, err = cli(capsys, monkeypatch, "export", "--store", f"sqlite:///{typo}", "--out", str(bundle))
    one_error_line(code, err, f"store 'sqlite:///{typo}' does not exist (no such file)")
    assert digest(bundle) == before and not typo.exists()
    code, _, err = cli(capsys, monkeypatch, "export", "--store", url, "--since", "1h", "--out", str(bundle))
    one_error_line(code, err, "no runs to export", "was left as it is", "--force")
    assert digest(bundle) == before
    assert cli(capsys, monkeypatch, "export", "--store", url, "--since", "1h", "--out", str(bundle), "--force")[0] == 0
    assert digest(bundle) != before  # asked for: replaced by an empty bundle


@pytest.mark.parametrize("command", [["runs"], ["learn"], ["export", "--out", "x.parquet"]])
def test_reading_a_store_in_a_missing_folder_is_refused_and_creates_nothing(tmp_path, capsys, monkeypatch, command):
    missing = tmp_path / "no-such-folder" / "runs.sqlite"
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, monkeypatch, *command, "--store", f"sqlite:///{missing}")
    one_error_line(code, err, "does not exist (its folder does not exist either)")
    assert not missing.parent.exists() and not (tmp_path / "x.parquet").exists()


def test_out_naming_a_folder_is_one_line_for_export_and_learn(seeded, tmp_path, capsys, monkeypatch):
    url, _ = seeded
    code, _, err = cli(capsys, monkeypatch, "export", "--store", url, "--out", str(tmp_path))
    one_error_line(code, err, f"--out '{tmp_path}' is a folder")
    code, _, err = cli(capsys, monkeypatch, "learn", "--store", url, "--learner", "tree", "--out", str(tmp_path))
    one_error_line(code, err, f"--out '{tmp_path}' is a folder")


def test_workbench_data_pointing_at_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    monkeypatch.setenv("WORKBENCH_DATA", str(a_file))
    code, _, err = cli(capsys, monkeypatch, "runs")
    one_error_line(code, err, f"WORKBENCH_DATA='{a_file}' is a file, not a folder")
    assert a_file.read_text() == "x"


def test_a_full_disk_during_export_keeps_the_old_bundle(seeded, tmp_path, cli_env):
    """RLIMIT_FSIZE stands in for a full disk: writing past it fails with EFBIG, as ENOSPC would."""
    url, _ = seeded
    bundle = tmp_path / "old.parquet"
    shutil.copy(SEED, bundle)
    before = digest(bundle)
    done = on_a_full_disk(cli_env, "export", "--store", url, "--out", str(bundle))
    one_error_line(done.returncode, done.stderr, "could not write", "the old file, if any, is unchanged")
    assert digest(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".old.parquet")) == []  # no partial file
    assert os.stat(bundle).st_size == os.stat(SEED).st_size


# -- the command line itself --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["runs", "--bogus"], "No such option: --bogus; see `workbench runs --help`"),
    (["nosuch"], "No such command 'nosuch'; see `workbench --help`"),
    (["sweep"], "Missing argument 'sweep_file'"),
    (["report", "--out", "r.html", "--cell-timeout", "-5"], "--cell-timeout -5 is invalid"),
    (["report", "--out", "r.html", "--timeout", "-1"], "--timeout -1 is invalid"),
])
def test_usage_errors_and_impossible_timeouts_are_one_line(tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, monkeypatch, *args)
    one_error_line(code, err, fragment)
    assert not (tmp_path / "r.html").exists()


def test_a_bom_workload_is_read_and_a_workload_folder_is_named(tmp_path):
    from workbench.errors import WorkloadError
    from workbench.specs import WorkloadSpec
    from workbench.workloads import load_workload

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "def add(a, b):"}).encode() + b"\n")
    assert load_workload(WorkloadSpec(str(bom))).items == [{"prompt": "def add(a, b):"}]
    folder = tmp_path / "prompts.jsonl"
    folder.mkdir()
    with pytest.raises(WorkloadError, match="is a folder, not a file: name a .jsonl file in it"):
        load_workload(WorkloadSpec(str(folder)))


# -- bundles imported twice, or twice at once -------------------------------------------------------------


def test_a_bundle_without_run_ids_imported_twice_adds_its_runs_once(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    table = pq.read_table(SEED)
    nameless = tmp_path / "nameless.parquet"
    column = table.schema.get_field_index("run_id")
    pq.write_table(table.set_column(column, "run_id", __import__("pyarrow").nulls(len(table), "string")), nameless)
    url = f"sqlite:///{tmp_path / 'twice.sqlite'}"
    for _ in range(2):
        code, _, err = cli(capsys, monkeypatch, "import", str(nameless), "--store", url)
        assert code == 0, err
    assert Store(url).count() == len(table)


def test_two_imports_of_one_bundle_at_once_both_succeed_and_store_it_once(tmp_path, cli_env, workbench_cmd):
    url = f"sqlite:///{tmp_path / 'race.sqlite'}"
    Store(url).close()
    imports = [subprocess.Popen([*workbench_cmd, "import", str(SEED), "--store", url], env=cli_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [process.communicate(timeout=300) for process in imports]
    assert [process.returncode for process in imports] == [0, 0], results
    assert Store(url).count() == len(pd.read_parquet(SEED))


# -- learner files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learner_file(tmp_path_factory) -> Path:
    from workbench.meta import persist
    from workbench.meta.recommend import train

    path = tmp_path_factory.mktemp("learner") / "good.skops"
    runs = pd.read_parquet(SEED)
    from workbench.exchange import read_bundle

    persist.save(train(read_bundle(SEED), learner="tree"), path)
    assert len(runs) > 0 and path.is_file()
    return path


def _dump(path: Path, obj) -> Path:
    import skops.io

    skops.io.dump(obj, path)
    return path


def test_a_learner_file_holding_other_estimators_is_refused_before_loading(tmp_path):
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from workbench.errors import WorkbenchError
    from workbench.meta import persist

    for name, model in (("linear", LinearRegression()), ("pipeline", Pipeline([("f", FunctionTransformer())]))):
        path = _dump(tmp_path / f"{name}.skops", {"meta": "{}", "models": {"speed_model_": model}})
        with pytest.raises(WorkbenchError, match="holds untrusted type\\(s\\) sklearn\\.") as info:
            persist.load(path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["list", "no models", "bad meta", "unknown param", "not a zip"])
def test_a_tampered_learner_file_is_one_line(tmp_path, learner_file, content):
    import zipfile

    from workbench.errors import WorkbenchError
    from workbench.meta import persist

    path = tmp_path / "tampered.skops"
    if content == "list":
        _dump(path, [1, 2, 3])
    elif content == "not a zip":
        path.write_bytes(b"PK not really")
    else:
        with zipfile.ZipFile(learner_file) as archive:
            import skops.io

            state = skops.io.load(learner_file, trusted=sorted(persist.stored_types(learner_file)))
        meta = json.loads(state["meta"])
        if content == "no models":
            state = {"meta": state["meta"]}
        elif content == "bad meta":
            state = {**state, "meta": "{not json"}
        else:
            meta["params"]["no_such_param"] = 1
            state = {**state, "meta": json.dumps(meta)}
        _dump(path, state)
    with pytest.raises(WorkbenchError) as info:
        persist.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_an_array_claiming_more_than_its_bytes_is_refused_before_allocating(tmp_path, learner_file):
    import io
    import zipfile

    from numpy.lib import format as npy

    from workbench.errors import WorkbenchError
    from workbench.meta import persist

    crafted = tmp_path / "crafted.skops"
    with zipfile.ZipFile(learner_file) as source, zipfile.ZipFile(crafted, "w") as target:
        swapped = False
        for member in source.infolist():
            data = source.read(member)
            if member.filename.endswith(".npy") and not swapped:
                header = io.BytesIO()
                npy.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**33,)})
                data, swapped = header.getvalue() + b"\0" * 64, True
            target.writestr(member, data)
    with pytest.raises(WorkbenchError, match="larger than its stored bytes") as info:
        persist.load(crafted)
    assert "\n" not in str(info.value)


# -- sweep files and technique parameters ------------------------------------------------------------------


def test_an_alias_bomb_in_labels_is_one_line_not_out_of_memory():
    from workbench.sweep import SweepError, parse_sweep

    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")  # 9**9 strings if expanded
    text = ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques: [baseline]\nlabels:\n"
            + "\n".join("  " + line for line in levels) + "\n")
    with pytest.raises(SweepError, match="line 4: labels=.* is invalid: use a mapping of names to strings") as info:
        parse_sweep(text)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_planning_reads_each_seeds_prompts_once_however_many_seeds(quick_zoo):
    """Five seeds cost five times one, not more: the prompt cache holds every seed of the sweep (with four
    entries it missed on every run once a fifth seed cycled through it)."""
    from workbench import datasets
    from workbench.sweep import parse_sweep, plan_sweep

    sweep = parse_sweep("models: [zoo:code-target]\nworkloads: [{name: code-prompts, max_items: 2}]\n"
                        "techniques: [baseline, quantization]\nseeds: [0, 1, 2, 3, 4]\n")
    datasets._prompt_candidates.cache_clear()
    plan_sweep(sweep)
    info = datasets._prompt_candidates.cache_info()
    assert info.misses <= 2 * 5 and info.hits >= info.misses  # each seed (and its calibration split) read once


def test_self_speculation_on_a_one_layer_model_says_what_would_work():
    from workbench.models.facts import ModelFacts
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
    from workbench.techniques.base import Facts
    from workbench.techniques.speculative import Speculative

    one_layer = ModelFacts(name="m", location="/nonexistent", kind="causal_lm", family="llama",
                           architecture="LlamaForCausalLM", layers=1, hidden_size=32, vocab_size=64, max_positions=64,
                           parameters=None, model_bytes=None, weights="safetensors", tokenizer_digest="t", digest="0")
    spec = RunSpec(ModelSpec("m"), WorkloadSpec("code-prompts"), TechniqueSpec("speculative", {"draft_layers": 50}))
    reason = Speculative(draft_layers=50).check(Facts(one_layer, None, "cpu", 4), spec)
    assert reason and "only 1 layer" in reason and "use 1 to 0" not in reason and "--draft" in reason


def test_ctrl_c_during_a_run_says_so_and_stores_nothing(quick_zoo, kept_store, cli_env, workbench_cmd):
    import signal
    import threading
    import time

    url, path = kept_store
    before = digest(path)
    process = subprocess.Popen([*workbench_cmd, "run", "--model", "zoo:code-classifier", "--technique", "baseline",
                                "--workload", "code-snippets", "--max-items", "64", "--repeats", "500",
                                "--warmup", "0", "--store", url], env=cli_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while "call/s" not in "".join(seen) and time.monotonic() < deadline:  # the progress bar: measuring
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    reader.join(timeout=10)
    err = "".join(seen)
    assert "interrupted: this run did not finish and nothing of it was stored" in err and "Traceback" not in err
    assert digest(path) == before


def test_out_naming_a_folder_is_one_line_for_explain_and_report(seeded, learner_file, tmp_path, capsys, monkeypatch):
    url, _ = seeded
    code, _, err = cli(capsys, monkeypatch, "explain", "--learner-path", str(learner_file), "--html", str(tmp_path))
    one_error_line(code, err, f"--html '{tmp_path}' is a folder")
    code, _, err = cli(capsys, monkeypatch, "report", "--store", url, "--since", "2026-11-01", "--out", str(tmp_path))
    one_error_line(code, err, f"--out '{tmp_path}'")


def test_one_sweep_started_twice_at_once_with_resume_runs_each_run_once(quick_zoo, tmp_path, cli_env, workbench_cmd):
    sweep_file = tmp_path / "twice.yaml"
    sweep_file.write_text("models: [zoo:code-classifier]\nworkloads: [{name: code-snippets, max_items: 2}]\n"
                          "techniques: [baseline, quantization, {name: early_exit, params: {threshold: 0.9}}]\n"
                          "repeats: 1\nwarmup: 0\n")
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    Store(url).close()
    sweeps = [subprocess.Popen([*workbench_cmd, "sweep", str(sweep_file), "--store", url, "--resume", "-q"],
                               env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in sweeps]
    assert [process.returncode for process in sweeps] == [0, 0], outputs
    frame = Store(url).runs(columns=["spec_key", "status"])
    assert len(frame) == 3 and frame["spec_key"].is_unique and set(frame["status"]) == {"ok"}
    done_here = [int(out.split(" ok,")[0].strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(done_here) == 3  # each run measured by exactly one of the two


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_stopping_a_report_stops_its_notebook_and_leaves_no_temporary_files(seeded, tmp_path, cli_env,
                                                                          workbench_cmd, stop):
    import signal
    import time

    import psutil

    url, _ = seeded
    out_dir = tmp_path / "reports"
    out_dir.mkdir()
    old = out_dir / "weekly.html"
    old.write_text("<html>last week's report</html>")
    process = subprocess.Popen([*workbench_cmd, "report", "--store", url, "--since", "2026-11-01", "--out", str(old)],
                               env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and not any("ipykernel" in " ".join(c.cmdline()) for c in children):
        time.sleep(0.2)  # until the notebook's kernel runs
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
    assert children, "the report never started its notebook"
    process.send_signal(getattr(signal, stop))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted: the report was not written" in err, err
    time.sleep(1.0)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert sorted(p.name for p in out_dir.iterdir()) == ["weekly.html"]  # no temporary folder left
    assert old.read_text() == "<html>last week's report</html>"


def test_a_store_on_read_only_media_is_read(seeded, tmp_path, capsys, monkeypatch):
    """A bind mount remounted read-only stands in for a read-only medium (root may not write there either)."""
    _, path = seeded
    source, mounted = tmp_path / "source", tmp_path / "readonly"
    source.mkdir()
    mounted.mkdir()
    for suffix in ("", "-wal"):  # the store as it is now (its rows may still sit in the -wal)
        if Path(f"{path}{suffix}").is_file():
            shutil.copy(f"{path}{suffix}", source / f"open.sqlite{suffix}")
            shutil.copy(f"{path}{suffix}", source / f"runs.sqlite{suffix}")
    with sqlite3.connect(source / "runs.sqlite") as conn:  # runs.sqlite as its last writer leaves it: no -wal
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    Path(source / "runs.sqlite-wal").unlink(missing_ok=True)
    mount = subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {mount.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        assert not os.access(mounted, os.W_OK)
        url = f"sqlite:///{mounted / 'runs.sqlite'}"
        code, out, err = cli(capsys, monkeypatch, "runs", "--store", url, "--format", "csv")
        assert code == 0 and "Traceback" not in err, err
        assert len(out.strip().splitlines()) == 1 + len(pd.read_parquet(SEED))
        bundle = tmp_path / "out.parquet"
        code, _, err = cli(capsys, monkeypatch, "export", "--store", url, "--out", str(bundle))
        assert code == 0 and bundle.is_file(), err
        if (source / "open.sqlite-wal").is_file() and (source / "open.sqlite-wal").stat().st_size:
            code, _, err = cli(capsys, monkeypatch, "runs", "--store", f"sqlite:///{mounted / 'open.sqlite'}")
            one_error_line(code, err, "is on read-only media with writes still in open.sqlite-wal")
    finally:  # lazily: the in-process CLI may still hold a pooled connection to the file
        subprocess.run(["umount", "-l", str(mounted)], capture_output=True)


def test_a_run_killed_on_timeout_leaks_no_semaphore(quick_zoo, tmp_path, cli_env, workbench_cmd):
    """The worker is killed mid-measurement; its tqdm lock must not be a multiprocessing semaphore left
    registered with the resource tracker (which warned of a leak at shutdown)."""
    sweep_file = tmp_path / "slow.yaml"
    sweep_file.write_text("models: [zoo:code-classifier]\nworkloads: [{name: code-snippets, max_items: 64}]\n"
                          "techniques: [baseline]\nrepeats: 1000\nwarmup: 0\n")
    done = subprocess.run([*workbench_cmd, "sweep", str(sweep_file), "--store", f"sqlite:///{tmp_path / 's.sqlite'}",
                           "--timeout-per-run", "8", "-q"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "timed out after 8 s" in done.stdout + done.stderr, done.stderr
    assert "leaked semaphore" not in done.stderr and "Traceback" not in done.stderr


def test_a_full_disk_during_learn_keeps_the_old_learner(seeded, tmp_path, cli_env):
    url, _ = seeded
    old = tmp_path / "team.learner.skops"
    old.write_bytes(b"the learner trained last week")
    done = on_a_full_disk(cli_env, "learn", "--store", url, "--learner", "tree", "--out", str(old))
    one_error_line(done.returncode, done.stderr, "could not write", "the old file, if any, is unchanged")
    assert old.read_bytes() == b"the learner trained last week"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".team.learner")] == []


def test_a_postgres_port_that_never_answers_is_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    import socket
    import threading

    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'workbench[cluster]'")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    try:
        code, _, err = cli(capsys, monkeypatch, "runs", "--store",
                           f"postgresql://u:Never-Printed-7@127.0.0.1:{listener.getsockname()[1]}/db")
    finally:
        listener.close()
        for conn in held:
            conn.close()
    one_error_line(code, err, "cannot reach the store", "u:***@127.0.0.1")
    assert "Never-Printed-7" not in err and held
