"""Sweeps on a real Ray cluster of two nodes on loopback, rows in a real PostgreSQL server.

The cluster is Ray's own test utility (``ray.cluster_utils.Cluster``): a head node offering hardware
``cpu-a`` and a second node offering ``cpu-b``, each a real raylet with its own worker processes. The
sweep is started through the CLI (``workbench sweep --ray ADDRESS``) as a user would; one run on node B
hangs on purpose (the worker's documented testing aid ``WORKBENCH_FAULT_INJECT``) so that killing node B
is sure to catch it mid-run.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from workbench.cluster import ClusterError, check_hardware, claim, connect, label_of, resource_name
from workbench.store import Store
from workbench.sweep import SweepError, parse_sweep
from workbench.worker import FAULT_ENV

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'workbench[cluster]'")

SWEEP = """
name: two-nodes
models: [zoo:code-classifier]
workloads: [{name: code-snippets, max_items: 2}]
techniques: [baseline, quantization, {name: early_exit, params: {threshold: 0.9}}]
hardware: [cpu-a, cpu-b]
repeats: 1
warmup: 0
timeout_per_run_s: 600
"""
HANGING_RUN = 5  # early_exit on cpu-b: runs expand techniques x hardware, so cpu-b has runs 1, 3 and 5


def test_hardware_labels_expand_key_and_claim_whole_nodes() -> None:
    sweep = parse_sweep(SWEEP)
    assert [label_of(spec) for spec in sweep.specs] == ["cpu-a", "cpu-b"] * 3
    assert len({spec.key() for spec in sweep.specs}) == 6  # one configuration on two kinds of machine: two runs
    assert claim(sweep.specs[1]) == {"num_cpus": 0, "num_gpus": 0, "resources": {"wb-hw:cpu-b": 1}}
    gpu = parse_sweep(SWEEP.replace("hardware: [cpu-a, cpu-b]", "devices: [cuda]")).specs[0]
    assert claim(gpu) == {"num_cpus": 0, "num_gpus": 1, "resources": {"wb-hw:gpu": 1}}
    with pytest.raises(ClusterError, match="offers hardware 'cpu-b' \\(nodes offer: cpu-a\\).*wb-hw:cpu-b") as info:
        check_hardware(sweep.specs, {"cpu-a": ["node-1"]}, "auto")
    assert "\n" not in str(info.value)


def test_hardware_labels_without_ray_or_with_a_bad_label_are_one_line(tmp_path: Path, quick_zoo: Path,
                                                                    cli_env: dict[str, str],
                                                                    workbench_cmd: list[str]) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    done = subprocess.run([*workbench_cmd, "sweep", str(sweep_file), "--store", f"sqlite:///{tmp_path / 's.sqlite'}"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "`hardware:` labels choose nodes of a Ray cluster: add --ray auto" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(SweepError, match="line 6: hardware\\[1\\]='cpu b!' is invalid: use a label of letters"):
        parse_sweep(SWEEP.replace("cpu-b]", "cpu b!]"))
    for address, fragment in (("127.0.0.1:1", "nothing answers there"), ("ray://h:1", "is not an address")):
        with pytest.raises(ClusterError, match=f"--ray '{address}'.*{fragment}") as info:
            connect(address)
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def cluster(quick_zoo: Path) -> Any:
    """Head node offering cpu-a, a second node offering cpu-b, for the whole file; sweep run 5 hangs on them."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_ENV, f"hang:{HANGING_RUN}")  # the raylets, and so their workers, inherit it
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        started = Cluster(initialize_head=True, connect=False, head_node_args={
            **NODE_ARGS, "resources": {resource_name("cpu-a"): 1},
            # a killed node is declared dead after ~1.5 s instead of ~30 s
            "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 3}})
        started.node_b = started.add_node(**NODE_ARGS, resources={resource_name("cpu-b"): 1})
        started.wait_for_nodes()
    yield started
    started.shutdown()


NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False}


def _wait_for_a_running_task(timeout_s: float = 120) -> None:
    """Until some node's Ray worker is executing a sweep's run (its process title is the task's name,
    ``ray::workbench-run-N``, while it does; ``ray::IDLE`` otherwise)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if (process.info["cmdline"] or [""])[0].startswith("ray::workbench-run-"):
                return
        time.sleep(0.2)
    raise AssertionError(f"no Ray worker started a run within {timeout_s} s")


def _sweep(workbench_cmd: list[str], sweep_file: Path, address: str, url: str, env: dict[str, str],
           *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*workbench_cmd, "sweep", str(sweep_file), "--ray", address, "--store", url, "-q", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(store: Store, count: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.count() < count:
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended early ({process.returncode}): {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"only {store.count()} of {count} rows after {timeout_s} s: {process.communicate()}")
        time.sleep(0.5)


def test_an_unknown_label_stops_before_any_run(
        cluster: Any, postgres: Any, tmp_path: Path, cli_env: dict[str, str], workbench_cmd: list[str]) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP.replace("cpu-b]", "gpu-h100]"))
    url = postgres.new_database()
    done = _sweep(workbench_cmd, sweep_file, cluster.address, url, cli_env)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 2 and "offers hardware 'gpu-h100' (nodes offer: cpu-a, cpu-b)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # the plan line, then the error
    assert Store(url).count() == 0 and postgres.password not in out + err


@pytest.mark.slow
def test_a_sweep_spreads_by_label_survives_a_dead_node_and_resumes(
        cluster: Any, postgres: Any, tmp_path: Path, cli_env: dict[str, str], workbench_cmd: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    url = postgres.new_database()
    store = Store(url)
    env = {**cli_env, FAULT_ENV: ""}  # the driver plans only; the nodes run (and run 5 hangs on node B)
    node_of = {"cpu-a": cluster.head_node.node_id, "cpu-b": cluster.node_b.node_id}
    # 1. Five runs finish on the nodes their labels ask for; run 5 hangs on node B; kill node B under it.
    sweep = _sweep(workbench_cmd, sweep_file, cluster.address, url, env)
    _wait_for_rows(store, 5, sweep, timeout_s=400)
    _wait_for_a_running_task()  # run 5, on node B, the moment run 3 ended there; it hangs
    cluster.remove_node(cluster.node_b, allow_graceful=False)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 1, err
    assert "5 ok, 1 failed, 0 skipped" in out and "Traceback" not in err
    frame = store.runs()
    assert len(frame) == 6 and frame["spec_key"].is_unique
    failed = frame[frame["status"] == "failed"]
    assert len(failed) == 1 and failed["spec"].iloc[0]["hardware"] == "cpu-b"
    assert "the Ray node running it was lost mid-run" in failed["failure_reason"].iloc[0]
    assert "rerun with --resume" in failed["failure_reason"].iloc[0]
    for _, row in frame[frame["status"] == "ok"].iterrows():
        label = row["spec"]["hardware"]
        assert row["environment"]["ray_node"] == {**row["environment"]["ray_node"], "hardware": label,
                                                  "node_id": node_of[label]}
    assert sorted(frame.loc[frame["status"] == "ok", "spec"].map(lambda s: s["hardware"])) == ["cpu-a"] * 3 + ["cpu-b"] * 2
    # 2. A new node B (without the fault) and --resume: only the failed run runs again, and lands there.
    monkeypatch.delenv(FAULT_ENV, raising=False)
    node_b2 = cluster.add_node(**NODE_ARGS, resources={resource_name("cpu-b"): 1})
    cluster.wait_for_nodes()
    resumed = _sweep(workbench_cmd, sweep_file, cluster.address, url, env, "--resume")
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err
    assert "1 ok, 0 failed, 0 skipped, 5 already stored" in out
    frame = store.runs()
    ok = frame[frame["status"] == "ok"]
    assert len(frame) == 7 and len(ok) == 6 and ok["spec_key"].is_unique
    last = frame.iloc[-1]
    assert last["status"] == "ok" and last["spec_key"] == failed["spec_key"].iloc[0]
    assert last["environment"]["ray_node"]["node_id"] == node_b2.node_id
    store.close()


@pytest.mark.slow
def test_a_label_left_without_nodes_fails_its_waiting_runs_and_the_sweep_ends(
        cluster: Any, postgres: Any, tmp_path: Path, cli_env: dict[str, str], workbench_cmd: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(SWEEP.replace("hardware: [cpu-a, cpu-b]", "hardware: [cpu-c]").replace(
        ", {name: early_exit, params: {threshold: 0.9}}", ""))
    first = parse_sweep(sweep_file.read_text()).specs[0]
    monkeypatch.setenv(FAULT_ENV, f"hang:{first.key()[:16]}")  # node C's first run hangs: the second waits
    node_c = cluster.add_node(**NODE_ARGS, resources={resource_name("cpu-c"): 1})
    cluster.wait_for_nodes()
    url = postgres.new_database()
    sweep = _sweep(workbench_cmd, sweep_file, cluster.address, url, {**cli_env, FAULT_ENV: ""})
    _wait_for_a_running_task()
    cluster.remove_node(node_c, allow_graceful=False)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 1 and "0 ok, 2 failed" in out, err
    frame = Store(url).runs()
    reason = {spec["technique"]["name"]: text for spec, text in zip(frame["spec"], frame["failure_reason"])}
    assert "the Ray node running it was lost mid-run" in reason["baseline"]
    assert "no live node of the Ray cluster offers hardware 'cpu-c' any more" in reason["quantization"]
    assert "wb-hw:cpu-c" in reason["quantization"] and "rerun with --resume" in reason["quantization"]
