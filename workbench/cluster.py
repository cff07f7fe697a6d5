"""Sweeps on a Ray cluster: each run is a Ray task placed on a node of the hardware its spec asks for,
one run per node (or per GPU) at a time, and the node that measured a run writes its row to the shared store.

A node says what it is with a custom resource named ``wb-hw:LABEL`` when it joins. Ray's custom
resources are only counters, so the count *is* the claim: a CPU node offers 1 (a run claims the whole
node, and nothing else of the sweep runs beside it), a GPU node offers one per GPU (a run claims one
unit and ``num_gpus=1``, so Ray hands it a whole GPU of its own)::

    ray start --head --port 6379 --resources '{"wb-hw:cpu-epyc": 1}'
    ray start --address HEAD:6379 --resources '{"wb-hw:gpu-h100": 8}' --num-gpus 8

A sweep names labels with ``hardware: [cpu-epyc, gpu-h100]`` (every run once per label); a run without
one asks for ``cpu`` or ``gpu`` by its device. Labels nobody offers stop the sweep before the first run.
Every node needs workbench installed, the sweep's models and workloads at the same paths (``workbench zoo
build`` on each, or a shared folder) and a route to the store, so a team store is PostgreSQL.

What can go wrong, and what is stored:
    a run that fails or crashes on its node: the node's worker isolation stores it failed with its reason;
    a node that dies mid-run: its run is stored failed ("the Ray node running it was lost ..."), the rest go on;
    the last node of a label gone: that label's waiting runs are stored failed after ``LOST_LABEL_GRACE_S``;
    Ctrl-C: every task is cancelled, finished rows are kept; ``--resume`` runs only what is not stored ok.

Example::

    >>> from workbench.sweep import parse_sweep
    >>> sweep = parse_sweep("models: [zoo:code-target]\\nworkloads: [code-prompts]\\n"
    ...                     "techniques: [baseline]\\nhardware: [cpu-a, cpu-b]")
    >>> [label_of(spec) for spec in sweep.specs]
    ['cpu-a', 'cpu-b']
    >>> claim(sweep.specs[0])
    {'num_cpus': 0, 'num_gpus': 0, 'resources': {'wb-hw:cpu-a': 1}}
    >>> outcome = run_sweep_on_ray(sweep, Store(url), address="auto")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from workbench.errors import WorkbenchError
from workbench.specs import RunSpec

RESOURCE_PREFIX = "wb-hw:"  # a node offering hardware LABEL has the custom resource "wb-hw:LABEL"
LOST_LABEL_GRACE_S = 10.0  # seconds a label may have no live node before its waiting runs are failed
POLL_S = 1.0  # how often the driver looks for finished runs and lost nodes
CONNECT_TIMEOUT_S = 30  # seconds Ray may take to reach the head's services once its port answers
REACH_TIMEOUT_S = 5  # seconds for the head's port to accept a connection at all
INSTALL_HINT = "pip install 'workbench[cluster]'"


class ClusterError(WorkbenchError):
    """A cluster problem (Ray missing, head unreachable, hardware nobody offers), in one line with the fix."""


def label_of(spec: RunSpec) -> str:
    """The hardware label a run asks for: its own, or ``cpu`` / ``gpu`` by its device."""
    if spec.hardware is not None:
        return spec.hardware
    return "gpu" if spec.device.startswith("cuda") else "cpu"


def resource_name(label: str) -> str:
    """The Ray custom resource a node offering ``label`` advertises."""
    return RESOURCE_PREFIX + label


def claim(spec: RunSpec) -> dict[str, Any]:
    """Ray task options that give a run a whole node (CPU) or a whole GPU of a node with its label.

    ``num_cpus=0``: the label's unit is the claim; Ray's CPU count would let several runs share a node.
    """
    gpu = spec.device.startswith("cuda")
    return {"num_cpus": 0, "num_gpus": 1 if gpu else 0, "resources": {resource_name(label_of(spec)): 1}}


def start_command(label: str, address: str | None = None) -> str:
    """The ``ray start`` line that adds a node offering ``label`` (one run at a time)."""
    where = "--head" if address is None else f"--address {address}"
    return f"ray start {where} --resources '{{\"{resource_name(label)}\": 1}}'"


# ----------------------------------------------------------------------------------------------------
# the cluster
# ----------------------------------------------------------------------------------------------------


def connect(address: str) -> Any:
    """Join the Ray cluster at ``address`` (``auto``: the one started on this machine) as a driver."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, which is not installed; install it with: {INSTALL_HINT}") from None
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", str(CONNECT_TIMEOUT_S))
    try:
        ray.init(address=address, namespace="workbench", logging_level="ERROR", log_to_driver=False,
                 configure_logging=False)
    except Exception as err:  # ConnectionError, ValueError, RuntimeError: all say the same to the user
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise ClusterError(f"cannot join the Ray cluster at --ray {address!r} ({detail}); start its head with "
                           f"`{start_command('cpu')}`, then pass --ray auto on that machine or --ray HEAD:6379"
                           ) from None
    return ray


def _check_reachable(address: str) -> None:
    """Refuse in seconds a HOST:PORT where nothing listens (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if address in ("auto", "local") or not sep:
        return
    if not port.isdigit() or not host or "://" in address:
        raise ClusterError(f"--ray {address!r} is not an address: use auto (the cluster started on this machine) "
                           "or HEAD:PORT, e.g. --ray 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(f"cannot join the Ray cluster at --ray {address!r} (nothing answers there: "
                           f"{err.strerror or type(err).__name__}); start its head with `{start_command('cpu')}`, "
                           "then pass its address, e.g. --ray HEAD:6379") from None


def offered_labels(ray: Any) -> dict[str, list[str]]:
    """Hardware label -> ids of the live nodes offering it."""
    labels: dict[str, list[str]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for resource in node.get("Resources", {}):
            if resource.startswith(RESOURCE_PREFIX):
                labels.setdefault(resource[len(RESOURCE_PREFIX):], []).append(node["NodeID"])
    return labels


def check_hardware(specs: list[RunSpec], offered: dict[str, list[str]], address: str) -> None:
    """Refuse, before the first run, a sweep asking for hardware that no live node offers."""
    wanted = sorted({label_of(spec) for spec in specs})
    missing = [label for label in wanted if label not in offered]
    if missing:
        have = ", ".join(sorted(offered)) or "none (no node was started with a wb-hw: resource)"
        raise ClusterError(f"no node of the Ray cluster at {address!r} offers hardware {missing[0]!r} (nodes offer: "
                           f"{have}); add one with `{start_command(missing[0], 'HEAD:6379')}`, or change "
                           "`hardware:` in the sweep")


# ----------------------------------------------------------------------------------------------------
# on a node
# ----------------------------------------------------------------------------------------------------

_ENVIRONMENTS: dict[str, dict[str, Any]] = {}  # device kind -> this node's fingerprint (once per Ray worker)


def run_on_node(plan_data: dict[str, Any], index: int, timeout_s: float | None, max_memory_gb: float | None,
                store_url: str, label: str) -> dict[str, Any]:
    """The Ray task: run one planned spec in an isolated worker on this node, store its row, say how it went.

    Whatever goes wrong here (a model missing on this node, a crash in the run) is stored as a failed
    run by this node; only the node's own death is left for the driver to store.
    """
    import ray

    from workbench.environment import fingerprint
    from workbench.runner import Plan
    from workbench.store import Store, json_safe
    from workbench.worker import WorkerLimits, _failed_result, run_isolated

    # 1. Where this runs, recorded with the row (the test of placement, and the history of a team's runs).
    spec = RunSpec.from_dict(plan_data["spec"])
    node = {"node_id": ray.get_runtime_context().get_node_id(), "hardware": label, "host": socket.gethostname()}
    device = spec.device.split(":")[0]
    if device not in _ENVIRONMENTS:
        _ENVIRONMENTS[device] = fingerprint(device=device)
    environment = {**_ENVIRONMENTS[device], "ray_node": node}
    # 2. The run, isolated as on one machine (timeout, memory cap, crash = failed row).
    try:
        row = run_isolated(Plan.from_dict(plan_data), WorkerLimits(timeout_s, max_memory_gb), index=index,
                           environment=environment)
    except WorkbenchError as err:
        reason = f"on node {node['host']} ({label}): {err}"
        row = json_safe(_failed_result(spec, plan_data["facts"], reason, environment, {}).to_row())
    row["environment"] = {**(row.get("environment") or environment), "ray_node": node}
    # 3. The row goes to the shared store from here; the driver only hears how it went.
    with Store(store_url) as store:
        run_id = store.append(row)
    return {"run_id": run_id, "status": row["status"], "failure_reason": row.get("failure_reason"),
            "node_id": node["node_id"]}


# ----------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------


def run_sweep_on_ray(sweep: Any, store: Any, address: str = "auto", resume: bool = False, limits: Any = None,
                     progress: bool = True, planned: list[Any] | None = None) -> Any:
    """Run a sweep as Ray tasks, each on a node of its hardware; same arguments and outcome as
    :func:`workbench.sweep.run_sweep`, plus the cluster's ``address`` (``auto`` or ``HOST:PORT``).

    Raises:
        ClusterError: before any run, when Ray is missing, the head cannot be reached or a label is not offered.
    """
    from tqdm.auto import tqdm

    from workbench.sweep import prepare, record

    # 1. Join the cluster, plan, drop what the store has, refuse hardware nobody offers.
    started = time.perf_counter()
    ray = connect(address)
    limits, outcome, todo = prepare(sweep, store, resume, limits, planned)
    check_hardware([item.spec for item in todo if item.skip_reason is None], offered_labels(ray), address)
    store_url = store.engine.url.render_as_string(hide_password=False)
    if store.engine.dialect.name == "sqlite":  # the nodes' working folders are not ours
        store_url = _absolute_sqlite(store_url)
    remote = ray.remote(max_retries=0)(run_on_node)
    bar = tqdm(total=len(todo), desc="sweep (ray)", unit="run", disable=not progress, dynamic_ncols=True)
    waiting: dict[Any, Any] = {}  # ObjectRef -> PlannedRun
    lost: dict[str, float] = {}  # label -> when its last live node was first missed
    try:
        # 2. Skipped rows are written here; every other run becomes a task claiming its node (or GPU).
        for item in todo:
            if item.skip_reason is not None:
                record(outcome, item, _skipped_row(item), bar, store)
                continue
            options = claim(item.spec)
            ref = remote.options(name=f"workbench-run-{item.index}", **options).remote(
                item.plan.to_dict(), item.index, limits.timeout_s, limits.max_memory_gb, store_url,
                label_of(item.spec))
            waiting[ref] = item
        # 3. Collect as runs finish; a lost node's run, or a label left with no node, is stored failed.
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
            for ref in ready:
                item = waiting.pop(ref)
                try:
                    answer = ray.get(ref)
                except Exception as err:  # the node or its Ray worker died, or the task was cancelled
                    answer = _store_lost(item, _lost_reason(err), store)
                record(outcome, item, answer, bar)
            for ref, item, reason in _orphans(ray, waiting, lost):
                waiting.pop(ref)
                ray.cancel(ref, force=True)
                record(outcome, item, _store_lost(item, reason, store), bar)
    except KeyboardInterrupt:
        outcome.interrupted = True
        for ref in waiting:
            ray.cancel(ref, force=True)
    finally:
        bar.close()
    outcome.wall_s = time.perf_counter() - started
    return outcome


def _skipped_row(item: Any) -> dict[str, Any]:
    """A skipped run's row, written by the driver (a technique's refusal is the same on every node)."""
    from workbench.runner import skipped_result

    return skipped_result(item.spec, item.skip_reason, {"ray_node": None}).to_row()


def _lost_reason(err: BaseException) -> str:
    """One line for a task that did not answer: it raised on its node (say what), or its node or Ray
    worker died (say so: the run itself may have been fine)."""
    cause = getattr(err, "cause", None)
    if cause is not None:  # ray.exceptions.RayTaskError: run_on_node itself raised, e.g. the store was unreachable
        detail = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")[:300]
        return f"the run's task failed on its node ({type(cause).__name__}: {detail}); rerun with --resume"
    detail = next((line.strip() for line in str(err).splitlines() if line.strip()), "")[:300]
    return (f"the Ray node running it was lost mid-run ({type(err).__name__}: {detail}); the other runs went on, "
            "rerun with --resume once the node is back")


def _store_lost(item: Any, reason: str, store: Any) -> dict[str, Any]:
    """Store a run its node could not report as failed, unless the node stored it ok just before dying."""
    from workbench.store import json_safe
    from workbench.worker import _failed_result

    if store.has_ok_run(item.spec.key()):  # the row was written, the task's answer was lost: nothing to add
        return {"run_id": None, "status": "ok", "failure_reason": None}
    environment = {"ray_node": {"hardware": label_of(item.spec), "lost": True}}
    row = json_safe(_failed_result(item.spec, item.plan.to_dict()["facts"], reason, environment, {}).to_row())
    return {"run_id": store.append(row), "status": "failed", "failure_reason": reason}


def _orphans(ray: Any, waiting: dict[Any, Any], lost: dict[str, float]) -> list[tuple[Any, Any, str]]:
    """Waiting runs whose label has had no live node for ``LOST_LABEL_GRACE_S``, with the reason to store."""
    if not waiting:
        return []
    offered, now = offered_labels(ray), time.monotonic()
    for label in {label_of(item.spec) for item in waiting.values()}:
        if label in offered:
            lost.pop(label, None)
        else:
            lost.setdefault(label, now)
    gone = {label for label, since in lost.items() if now - since >= LOST_LABEL_GRACE_S}
    return [(ref, item, f"no live node of the Ray cluster offers hardware {label_of(item.spec)!r} any more (its "
                        f"last node left before this run started); add one with `{start_command(label_of(item.spec), 'HEAD:6379')}` "
                        "and rerun with --resume")
            for ref, item in waiting.items() if label_of(item.spec) in gone]


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with an absolute path: Ray workers start in folders of their own."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.database or parsed.database == ":memory:":
        raise ClusterError("an in-memory SQLite store cannot be shared with Ray nodes; use a file "
                           "(sqlite:///runs.sqlite, one machine) or PostgreSQL (postgresql://user@host/db, a team)")
    return parsed.set(database=os.path.abspath(os.path.expanduser(parsed.database))).render_as_string(
        hide_password=False)
