"""Sweeps: the YAML format, planning before running, worker isolation, interrupt and resume.

The crash tests make trials fail for real inside their worker process with the documented testing aid
``WORKBENCH_FAULT_INJECT`` (a segfault, an abort, a hang, a memory blow-up, an exception) and check what
the store holds afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from workbench.errors import WorkbenchError
from workbench.store import Store
from workbench.sweep import SweepError, parse_sweep, plan_sweep, read_sweep, run_sweep
from workbench.worker import FAULT_ENV, WorkerLimits, parse_faults

CHEAP = """
models: [zoo:code-classifier]
workloads: [{{name: code-snippets, max_items: 2}}]
techniques: [{techniques}]
seeds: {seeds}
repeats: 1
warmup: 0
"""


def cheap_sweep(techniques: str = "baseline", seeds: list[int] = (0,)) -> str:
    return CHEAP.format(techniques=techniques, seeds=list(seeds))


# ----------------------------------------------------------------------------------------------------
# the format: expansion and one-line errors with line numbers (no model, no store)
# ----------------------------------------------------------------------------------------------------


def test_expands_the_cartesian_product_in_order_with_per_model_safety_flags():
    sweep = parse_sweep("""
name: demo
models:
  - zoo:code-target
  - {name: some/hub-model, trust_remote_code: true, allow_pickle: true}
workloads: [{name: code-prompts, max_items: 4, max_new_tokens: 16}]
techniques:
  - baseline
  - {name: speculative, draft: zoo:code-draft, grid: {num_assistant_tokens: [2, 4]}}
seeds: [0, 1]
repeats: 3
""")
    assert len(sweep.specs) == 2 * 1 * 3 * 2 and len({s.key() for s in sweep.specs}) == 12
    first, last = sweep.specs[0], sweep.specs[-1]
    assert (first.model.name, first.technique.name, first.seed, first.repeats) == ("zoo:code-target", "baseline", 0, 3)
    assert not first.model.trust_remote_code and not first.model.allow_pickle  # safe by default
    assert last.model.trust_remote_code and last.model.allow_pickle  # asked for per model entry
    assert last.technique.param_dict == {"num_assistant_tokens": 4} and last.technique.draft.name == "zoo:code-draft"
    assert last.workload.seed == 1 and dict(last.labels) == {"sweep": "demo"}


VALID = "models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques: [baseline]\n"


@pytest.mark.parametrize("text, fragment", [
    ("models: [zoo:code-target\n", "line 2 column 1: invalid YAML"),
    ("models: [a]\n  bad: indentation\n", "line 2"),
    ("", "empty"),
    ("- a\n- b\n", "is a list, not a mapping"),
    (VALID + "seed: [1]\n", "line 4: unknown key 'seed': did you mean 'seeds'?"),
    (VALID + "repeat: 3\n", "did you mean 'repeats'?"),
    (VALID + "models: [x]\n", "duplicate key 'models' (first on line 1)"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\n", "no `techniques:` list"),
    ("models: zoo:code-target\nworkloads: [code-prompts]\ntechniques: [baseline]\n", "line 1: `models` is a string"),
    ("models: []\nworkloads: [code-prompts]\ntechniques: [baseline]\n", "(empty)"),
    ("models: [zoo:code-target]\nworkloads:\n  - {name: code-prompts, max_itmes: 4}\ntechniques: [baseline]\n",
     "line 3: unknown key 'max_itmes' in workloads[0]: did you mean 'max_items'?"),
    ("models: [zoo:code-target]\nworkloads:\n  - {name: code-prompts, max_items: '4'}\ntechniques: [baseline]\n",
     "workloads[0].max_items='4' is invalid"),
    ("models: [{name: gpt2, trust_remote_code: yes please}]\nworkloads: [a]\ntechniques: [baseline]\n",
     "trust_remote_code='yes please' is invalid: use true or false"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques:\n"
     "  - {name: speculative, grid: {num_assistant_tokens: 4}}\n", "line 4: techniques[0].grid.num_assistant_tokens=4"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques:\n  - {name: baseline, draft: zoo:code-draft}\n",
     "line 4: techniques[0]: technique 'baseline' takes no draft model"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques:\n"
     "  - {name: speculative, grid: {num_assitant_tokens: [2]}}\n", "did you mean 'num_assistant_tokens'?"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques: [speculativ]\n", "speculativ"),
    (VALID + "techniques: [baseline, baseline]\n", "duplicate key"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques: [baseline, baseline]\n",
     "runs 0 and 1 are the same run"),
    (VALID + "devices: [tpu]\n", "line 4: devices[0]='tpu' is unknown"),
    (VALID + "dtypes: [float8]\n", "dtypes[0]='float8' is unknown"),
    (VALID + "repeats: true\n", "repeats=True is invalid"),
    (VALID + "timeout_per_run_s: -1\n", "timeout_per_run_s=-1 is invalid"),
    ("models: [zoo:code-target]\nworkloads: [code-prompts]\ntechniques:\n"
     "  - {name: speculative, grid: {num_assistant_tokens: [1,2,3,4,5,6,7,8,9,10,11],\n"
     "     temperature: [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0], draft_layers: [1,2,3,4,5,6,7,8,9,10],\n"
     "     prompt_lookup_num_tokens: [1,2,3,4,5,6,7,8,9,10]}}\n", "more than 10,000"),
])
def test_bad_sweep_files_are_one_line_naming_the_place_and_the_fix(text, fragment):
    with pytest.raises(SweepError) as info:
        parse_sweep(text, source="s.yaml")
    message = str(info.value)
    assert fragment in message and message.startswith("s.yaml") and "\n" not in message


def test_unreadable_files_are_one_line(tmp_path):
    for path, fragment in ((tmp_path / "missing.yaml", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(SweepError, match=fragment):
            read_sweep(path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"models: [\xff\xfe]\n")
    with pytest.raises(SweepError, match="not UTF-8"):
        read_sweep(binary)


def test_fault_injection_values_are_checked():
    assert parse_faults("segfault:3, hang:abcdef0123") == [("segfault", "3"), ("hang", "abcdef0123")]
    with pytest.raises(WorkbenchError, match="KIND:TARGET"):
        parse_faults("explode:1")


def test_limits_are_validated():
    with pytest.raises(WorkbenchError, match="--timeout-per-run"):
        WorkerLimits(timeout_s=0)
    with pytest.raises(WorkbenchError, match="--max-memory"):
        WorkerLimits(max_memory_gb=float("nan"))


# ----------------------------------------------------------------------------------------------------
# planning: the whole sweep before any run; inapplicable combinations are skipped with the reason
# ----------------------------------------------------------------------------------------------------


def test_plan_marks_inapplicable_runs_and_stops_on_bad_input(quick_zoo, tmp_path):
    sweep = parse_sweep(cheap_sweep("baseline, speculative") + "devices: [cpu, cuda]\n")
    planned = plan_sweep(sweep)
    reasons = [p.skip_reason for p in planned]
    assert reasons[0] is None and "classifier" in reasons[2]
    if not __import__("torch").cuda.is_available():
        assert "no CUDA GPU" in reasons[1]
    with pytest.raises(SweepError, match=r"run 0 \(models\[0\] \(line 2\).*unknown zoo model 'nope'"):
        plan_sweep(parse_sweep(cheap_sweep().replace("zoo:code-classifier", "zoo:nope")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": 0}\n{not json\n')
    with pytest.raises(SweepError, match="line 2"):
        plan_sweep(parse_sweep(cheap_sweep().replace("code-snippets", str(bad))))


def test_cli_bad_input_is_one_line_and_exit_2_before_any_run(quick_zoo, workbench_cmd, cli_env, tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(cheap_sweep().replace("seeds", "seedz"))
    store = tmp_path / "runs.sqlite"
    out = subprocess.run([*workbench_cmd, "sweep", str(sweep_file), "--store", f"sqlite:///{store}"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "line 5: unknown key 'seedz': did you mean 'seeds'?" in out.stderr
    assert not store.exists()  # nothing was started, not even the store


def test_cli_unreachable_store_is_one_line_and_exit_2(quick_zoo, workbench_cmd, cli_env, tmp_path):
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(cheap_sweep())
    out = subprocess.run([*workbench_cmd, "sweep", str(sweep_file), "--store", "postgresql://u:secret@127.0.0.1:1/db"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "127.0.0.1" in out.stderr and "secret" not in out.stderr


# ----------------------------------------------------------------------------------------------------
# isolation: real crashes in real workers become failed runs; the sweep goes on
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_crashes_become_failed_runs_and_the_sweep_goes_on(quick_zoo, tmp_path, monkeypatch):
    # Run 0 hangs and this test SIGKILLs its worker; run 1 aborts; run 2 exhausts its memory cap;
    # run 3 raises inside the worker.
    monkeypatch.setenv(FAULT_ENV, "hang:0,abort:1,oom:2,exception:3")
    store = Store(f"sqlite:///{tmp_path / 'runs.sqlite'}")
    sweep = parse_sweep(cheap_sweep(seeds=[0, 1, 2, 3]))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_sweep(
        sweep, store, limits=WorkerLimits(timeout_s=120, max_memory_gb=6), progress=False)))
    thread.start()
    victim = _wait_for_worker(psutil.Process(), timeout_s=60)
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=300)
    result = outcome["result"]
    assert (result.ok, result.failed, result.interrupted) == (0, 4, False)
    frame = store.runs()
    reasons = dict(zip(frame["seed"], frame["failure_reason"]))
    assert reasons[0].startswith("worker killed by signal SIGKILL")
    assert reasons[1] == "worker killed by signal SIGABRT"
    assert reasons[2] == "out of memory (limit 6 GB of address space): MemoryError"
    assert reasons[3] == "worker raised RuntimeError: injected by WORKBENCH_FAULT_INJECT"
    assert set(frame["status"]) == {"failed"} and len(frame) == 4


def _wait_for_worker(parent: psutil.Process, timeout_s: float) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = _workers(parent)
        if workers:
            return workers[0]
        time.sleep(0.1)
    raise AssertionError("no worker process appeared")


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """Run workers of ``parent``: forked by its forkserver (Linux), or spawned by it."""
    found = []
    for child in parent.children():
        command = " ".join(_cmdline(child))
        if "spawn_main" in command:
            found.append(child)
        elif "forkserver" in command:
            found.extend(child.children())
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


# ----------------------------------------------------------------------------------------------------
# acceptance: 20 runs, one segfault and one timeout, SIGINT halfway, --resume runs only what is missing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_of_20_survives_a_segfault_a_timeout_and_ctrl_c(quick_zoo, workbench_cmd, cli_env, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(cheap_sweep("baseline, quantization", seeds=list(range(10))))
    url = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    env = {**cli_env, FAULT_ENV: "segfault:12,hang:17"}
    command = [*workbench_cmd, "sweep", str(sweep_file), "--store", url, "--timeout-per-run", "15", "--quiet"]
    keys = [spec.key() for spec in read_sweep(sweep_file).specs]
    assert len(keys) == 20

    # 1. Start the sweep and press Ctrl-C halfway: run 6 hangs (no timeout in this first pass), so the
    #    interrupt always lands while a worker is busy, however fast the machine runs 0-5.
    first_env = {**cli_env, FAULT_ENV: "hang:6"}
    first = subprocess.Popen([*command[:-3], "--timeout-per-run", "600", "--quiet"], env=first_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(url, 6, first, timeout_s=240)
        time.sleep(1.0)  # run 6's worker is starting or hanging
        workers = psutil.Process(first.pid).children(recursive=True)  # the forkserver and its workers
        assert _workers(psutil.Process(first.pid)), "no run worker was busy when Ctrl-C came"
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    # 2. The store holds exactly the finished runs, all ok, each one the sweep's run of that index.
    frame = Store(url).runs()
    done = len(frame)
    assert done == 6 and set(frame["status"]) == {"ok"}
    assert list(frame["spec_key"]) == keys[:done]

    # 3. --resume runs only what is missing; the segfault and the timeout fail one run each.
    second = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr
    assert f"{done} already stored" in second.stderr
    frame = Store(url).runs()
    assert len(frame) == 20 and sorted(frame["spec_key"]) == sorted(keys)  # nothing lost, nothing twice
    failed = frame[frame["status"] == "failed"].set_index("spec_key")["failure_reason"].to_dict()
    assert failed == {keys[12]: "worker killed by signal SIGSEGV", keys[17]: "timed out after 15 s"}
    assert (frame["status"] == "ok").sum() == 18
    assert f"{18 - done} ok, 2 failed, 0 skipped, {done} already stored, 0 not run" in second.stdout


def _wait_for_rows(url: str, rows: int, process: subprocess.Popen, timeout_s: float) -> None:
    store = Store(url) if Path(url.removeprefix("sqlite:///")).exists() else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if store is None and Path(url.removeprefix("sqlite:///")).exists():
            time.sleep(0.5)  # let the sweep finish creating the store
            store = Store(url)
        if store is not None and store.count() >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {rows} rows after {timeout_s} s")

