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
