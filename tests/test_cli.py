"""The command line as a user runs it: real subprocesses, real store files."""

import json
import sqlite3
import subprocess

import pytest


def run_cli(cmd, env, *args, timeout=600):
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.sqlite'}"


SMALL = ["--max-items", "2", "--max-new-tokens", "6", "--repeats", "2", "--warmup", "1", "--quiet"]


def test_run_json_then_runs(quick_zoo, workbench_cmd, cli_env, store_url):
    done = run_cli(workbench_cmd, cli_env, "run", "--model", "zoo:code-target", "--technique", "speculative",
                   "--draft", "zoo:code-draft", "--workload", "code-prompts", "--store", store_url, "--json", *SMALL)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["status"] == "ok"
    assert data["spec"]["technique"]["draft"]["name"] == "zoo:code-draft"
    assert set(data["summary"]["variants"]) == {"baseline", "speculative"}
    comp = data["summary"]["comparison"]
    assert comp["ci_low"] <= comp["speedup"] <= comp["ci_high"]
    assert data["quality"]["exact_match_rate"] == 1.0
    assert "target_forward_passes" in data["internals"]["technique"]
    assert len(data["outputs"]) == 2 and {"baseline", "technique", "input"} <= set(data["outputs"][0])
    listed = run_cli(workbench_cmd, cli_env, "runs", "--store", store_url, "--since", "1d", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1 and rows[0]["run_id"] == data["run_id"][:12] and rows[0]["technique"] == "speculative"
    csv_out = run_cli(workbench_cmd, cli_env, "runs", "--store", store_url, "--format", "csv")
    assert csv_out.stdout.splitlines()[0].startswith("created_at,run_id,status")


def test_runs_table_fits_100_columns_and_prints_no_escapes(workbench_cmd, cli_env, store_url):
    """The default table: key columns and the params column within 100 characters a line, whatever is
    stored (a model name carrying terminal escapes, a reason with a newline); --wide: every column, uncut."""
    from workbench.store import Store

    hostile = "zoo:evil\x1b]0;pwned\x07\x1b[2J" + "x" * 300
    common = {"spec_key": "s", "workload": "code-prompts", "device": "cpu", "dtype": "float32", "seed": 0,
              "repeats": 3, "warmup": 1}
    store = Store(store_url)
    store.append({**common, "status": "ok", "model": "zoo:code-target", "technique": "early_exit",
                  "params": {"threshold": 0.8, "train_steps": 300}, "speedup": 1.23456, "speedup_ci_low": 1.1,
                  "speedup_ci_high": 1.4, "quality": {"perplexity_change_percent": 0.4123},
                  "noisy": True, "noise": {"others_cores_during": 1.5}})
    store.append({**common, "status": "failed", "model": hostile, "technique": "speculative",
                  "params": {"prompt_lookup_num_tokens": 3}, "failure_reason": "out of memory\n\x1b[31mred"})
    done = run_cli(workbench_cmd, cli_env, "runs", "--store", store_url, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and all(len(line) <= 100 for line in lines), done.stdout
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert lines[0].split() == ["run", "created", "model", "technique", "params", "speedup", "(95%", "CI)", "quality"]
    # non-default settings in words (train_steps=300 is the default), 3 significant figures, quality in its unit
    assert "early exit" in lines[1] and "threshold 0.8" in lines[1] and "train steps" not in lines[1]
    assert "1.23x (1.1-1.4) *" in lines[1] and "ppl +0.412%" in lines[1]
    assert lines[3].startswith("* measured on a noisy machine")
    assert "failed" in lines[2] and "…" in lines[2]  # the long model name is cut
    wide = run_cli(workbench_cmd, cli_env, "runs", "--store", store_url, "--wide", timeout=120)
    assert wide.returncode == 0, wide.stderr
    assert "\x1b" not in wide.stdout and "\x07" not in wide.stdout
    header = wide.stdout.splitlines()[0].split()
    assert {"workload", "device", "verdict", "machine", "failure_reason", "params"} <= set(header)
    assert "x" * 300 in wide.stdout and "threshold=0.8,train_steps=300" in wide.stdout  # nothing cut
    csv_out = run_cli(workbench_cmd, cli_env, "runs", "--store", store_url, "--format", "csv", timeout=120)
    assert csv_out.returncode == 0 and "\x1b" not in csv_out.stdout and "\x07" not in csv_out.stdout
    assert "zoo:evil?]0;pwned??[2J" in csv_out.stdout  # shown, made harmless


def test_run_prints_a_side_by_side_table(quick_zoo, workbench_cmd, cli_env, store_url):
    done = run_cli(workbench_cmd, cli_env, "run", "-m", "zoo:code-classifier", "-t", "baseline",
                   "-w", "code-snippets", "--store", store_url, *SMALL)
    assert done.returncode == 0, done.stderr
    assert "latency_median_ms" in done.stdout and "baseline_again" in done.stdout
    assert "speedup" in done.stdout and "accuracy" in done.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-m", "zoo:no-such-model", "-t", "baseline", "-w", "code-prompts"], "no-such-model"),
        (["-m", "zoo:code-draft", "-t", "speculatve", "-w", "code-prompts"], "unknown technique 'speculatve'"),
        (["-m", "zoo:code-draft", "-t", "baseline", "-w", "code-prompts", "--repeats", "0"], "repeats=0"),
        (["-m", "zoo:code-draft", "-t", "baseline", "-w", "no-such-workload"], "no-such-workload"),
        (["-m", "zoo:code-draft", "-t", "speculative", "-w", "code-prompts", "-p", "num_asistant_tokens=3",
          "--draft", "zoo:code-draft"], "did you mean 'num_assistant_tokens'"),
        (["-m", "zoo:code-draft", "-t", "baseline", "-w", "code-prompts", "-p", "oops"], "not key=value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(quick_zoo, workbench_cmd, cli_env, store_url, args, fragment):
    done = run_cli(workbench_cmd, cli_env, "run", *args, "--store", store_url, "--quiet", timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert done.stdout == ""


def test_malformed_workload_file_names_the_line(quick_zoo, workbench_cmd, cli_env, store_url, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "def f():"}\n{"prompt": \n')
    done = run_cli(workbench_cmd, cli_env, "run", "-m", "zoo:code-draft", "-t", "baseline", "-w", str(bad),
                   "--store", store_url, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "prompts.jsonl:2" in done.stderr


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("postgresql://user:secret@127.0.0.1:1/nowhere", "127.0.0.1"),
        ("notadialect://x", "notadialect"),
    ],
)
def test_unreachable_store_is_one_line_and_exit_2(quick_zoo, workbench_cmd, cli_env, url, fragment):
    done = run_cli(workbench_cmd, cli_env, "run", "-m", "zoo:code-draft", "-t", "baseline", "-w", "code-prompts",
                   "--store", url, "--quiet", timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "secret" not in lines[0]


def test_a_foreign_sqlite_file_is_refused_and_untouched(workbench_cmd, cli_env, tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as con:
        con.execute("create table customers (id integer)")
    before = path.read_bytes()
    done = run_cli(workbench_cmd, cli_env, "runs", "--store", f"sqlite:///{path}", timeout=120)
    assert done.returncode == 2 and "not a workbench store" in done.stderr
    assert path.read_bytes() == before


def test_env_and_techniques(workbench_cmd, cli_env):
    env = run_cli(workbench_cmd, cli_env, "env", "--json", timeout=120)
    assert env.returncode == 0, env.stderr
    info = json.loads(env.stdout)
    assert info["cpu_cores_logical"] >= 1 and info["memory_bandwidth_bytes_per_s"] > 1e8
    listed = run_cli(workbench_cmd, cli_env, "techniques", timeout=120)
    assert "speculative" in listed.stdout and "num_assistant_tokens" in listed.stdout
