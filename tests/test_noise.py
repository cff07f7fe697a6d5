"""Noise detection: a run measured while other processes take the cores is stored and shown as noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from workbench import noise
from workbench.store import Store

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def busy_processes(count: int, seconds: float) -> list[subprocess.Popen]:
    """Real processes that each keep one core busy for ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(count)]


def test_thresholds_and_words_on_synthetic_records() -> None:
    quiet = {"others_cores_before": 0.02, "others_cores_during": 0.05, "steal_percent_during": 0.0}
    assert not noise.is_noisy(quiet) and noise.summary_text(quiet) == ""
    busy = {**quiet, "others_cores_during": 1.7, "top_processes_during": [{"command": "python3", "cores": 1.69}]}
    assert noise.is_noisy(busy)
    assert noise.summary_text(busy) == ("noisy machine: other processes used 1.70 cores during the run "
                                        "(python3 1.69)")
    assert noise.is_noisy({"steal_percent_during": 12.0}) and noise.is_noisy({"gpu_busy_percent_before": 60.0})
    assert not noise.is_noisy({}) and not noise.is_noisy(None)  # not measured is not noisy
    assert noise.threads_for(2.0, 2) == 2 and noise.threads_for(0.3, 2) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="contention is read from Linux /proc")
def test_a_probe_sees_a_busy_process_by_name() -> None:
    spinners = busy_processes(1, 20)
    try:
        time.sleep(0.3)
        seen = noise.probe(1.0)
    finally:
        for p in spinners:
            p.kill()
    assert seen["others_cores"] > 0.5, seen  # one core of other work on the CPUs this process may use
    assert any(p["pid"] == spinners[0].pid for p in seen["top_processes"]), seen["top_processes"]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="contention is read from Linux /proc")
def test_a_run_beside_busy_processes_is_stored_and_shown_as_noisy(quick_zoo, workbench_cmd, cli_env, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'noisy.sqlite'}"
    cores = noise.cores_available()
    spinners = busy_processes(cores, 300)  # every core this process may use, busy with other work
    try:
        time.sleep(0.3)
        done = subprocess.run([*workbench_cmd, "run", "-m", "zoo:code-classifier", "-t", "baseline", "-w",
                               "code-snippets", "--max-items", "8", "--repeats", "2", "--store", store_url, "-q"],
                              env=cli_env, capture_output=True, text=True, timeout=600)
    finally:
        for p in spinners:
            p.kill()
    assert done.returncode == 0, done.stderr
    assert "noisy machine: other processes used" in done.stdout and "WARNING" in done.stdout
    # threads follow the free cores: the spinners leave (almost) none, so one thread, and it says why
    assert "threads: 1 (" in done.stdout and "other processes busy on" in done.stdout
    row = Store(store_url).runs().iloc[-1]
    assert bool(row["noisy"]) and row["noise"]["others_cores_during"] >= noise.NOISY_OTHERS_CORES
    assert {p["pid"] for p in row["noise"]["top_processes_during"]} & {p.pid for p in spinners}
    assert row["environment"]["threads_chosen"]["threads"] == 1
    listed = subprocess.run([*workbench_cmd, "runs", "--store", store_url, "--format", "json"], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[-1]["machine"] == "noisy machine"


def test_calibration_runs_the_baseline_against_itself_and_counts_verdicts(quick_zoo, tmp_path):
    from workbench.calibration import calibrate
    from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec

    store = Store(f"sqlite:///{tmp_path / 'aa.sqlite'}")
    spec = RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=4),
                   TechniqueSpec("early_exit"), repeats=2)  # the technique is replaced by the baseline
    result = calibrate(spec, times=2, store=store)
    assert result.spec.technique.name == "baseline" and len(result.runs) == 2
    assert {r["verdict"] for r in result.runs} <= {"no practical difference", "faster", "slower"}
    assert result.rate in (0.0, 0.5, 1.0) and "A/A calibration" in result.text()
    stored = store.runs()
    assert len(stored) == 2 and set(stored["technique"]) == {"baseline"} and stored["noise"].notna().all()
    with pytest.raises(Exception, match="times=0"):
        calibrate(spec, times=0)
