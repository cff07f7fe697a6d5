"""Run one trial in its own worker process, so a crash, a hang or a memory blow-up costs one run only.

The worker is forked from a *forkserver* (multiprocessing's clean server process, started once per
parent with torch, transformers and the runner already imported, never a fork of the parent itself),
so each run starts in a fraction of a second instead of paying the imports again; where there is no
forkserver (Windows) it is spawned. It receives the parent's environment variables and working
directory as they are when the run starts, and the parent's :class:`~workbench.runner.Plan` as JSON (it never plans again: the model
files were read and the technique's check passed in the parent), executes it and sends the finished store row back
through a pipe as JSON text; the parent writes it to the store. Whatever happens to the worker, the
parent gets a row: a timeout, a signal (segfault, abort, the kernel's OOM killer), an exception or a
memory limit all become a *failed* run with a one-line reason, e.g. ``worker killed by signal SIGSEGV``
or ``timed out after 30 s``.

Limits:
    ``timeout_s`` is the wall-clock time of the run itself: it starts when the worker has imported its
    libraries and planned the spec (a few seconds, bounded separately by ``STARTUP_TIMEOUT_S``), so a
    busy machine's slow imports never time a run out.
    ``max_memory_gb`` caps the worker's address space with ``resource.setrlimit(RLIMIT_AS)``; note that
    torch alone reserves about 1.5 GB of address space on import, so limits under ~3 GB fail every run.

Testing aid (read only here, in the worker): ``WORKBENCH_FAULT_INJECT`` makes chosen trials fail for
real, to test the isolation itself. It is a comma-separated list of ``KIND:TARGET``, where TARGET is the
run's index in the sweep (0-based) or a prefix (8+ characters) of its ``RunSpec.key()``, and KIND is one
of ``segfault`` (reads address 0), ``abort`` (``os.abort()``), ``hang`` (sleeps forever), ``exception``
(raises RuntimeError), ``oom`` (allocates until MemoryError, under ``max_memory_gb`` or 512 MB more
than it has mapped) or ``exit`` (``os._exit(3)``). Faults fire
after the worker has imported and planned, right before measuring. Never set it outside tests.

Example:
    >>> from workbench.specs import ModelSpec, RunSpec, TechniqueSpec, WorkloadSpec
    >>> from workbench.runner import plan
    >>> spec = RunSpec(ModelSpec("zoo:code-classifier"), WorkloadSpec("code-snippets", max_items=4),
    ...                TechniqueSpec("quantization"), repeats=1)
    >>> row = run_isolated(plan(spec), WorkerLimits(timeout_s=120))  # doctest: +SKIP
    >>> row["status"], row["internals"]["worker"]["startup_s"]  # doctest: +SKIP
    ('ok', 3.1)
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.errors import WorkbenchError
from workbench.specs import RunSpec, SpecError

if TYPE_CHECKING:
    from workbench.runner import Plan

FAULT_ENV = "WORKBENCH_FAULT_INJECT"
FAULT_KINDS = ("segfault", "abort", "hang", "exception", "oom", "exit")
_PARENT_CHECK_S = 1.0  # how often a worker checks that its parent is still alive
#: Seconds a worker may take to start: spawn a fresh interpreter, import torch and transformers, plan.
STARTUP_TIMEOUT_S = 300.0
#: Imported once by the forkserver, so forked workers start with them loaded (the bulk of a run's start-up).
PRELOAD_MODULES = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation",
                   "workbench.runner", "workbench.techniques"]
_READY = b"ready"  # the worker's first message: imports and plan done, the run starts
_CALLS = b"calls:"  # b"calls:12/40": timed calls done of all (only to an IsolatedRun, which asked for them)
CALLS_EVERY_S = 0.1  # the fewest seconds between two progress messages (sent between timed calls, never
# inside one; the first and the last are always sent)


@dataclass(frozen=True)
class WorkerLimits:
    """Limits on one trial's worker process.

    Example:
        >>> WorkerLimits(timeout_s=600, max_memory_gb=8).max_memory_bytes
        8589934592
    """

    timeout_s: float | None = None  # wall-clock seconds per run after start-up; None waits forever
    max_memory_gb: float | None = None  # address-space cap (RLIMIT_AS) in GiB; None leaves it unlimited

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_memory_gb"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and 0 < value < float("inf"))
            if not ok:
                flag = "--timeout-per-run" if name == "timeout_s" else "--max-memory"
                raise SpecError(f"{name}={value!r} is invalid: give {flag} a positive number, or leave it out")

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory_gb is None else int(self.max_memory_gb * 2**30)


def run_isolated(plan_: Plan, limits: WorkerLimits = WorkerLimits(), index: int = 0,
                 environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a planned spec in a fresh spawned process and return its store row (JSON-safe dict).

    Never raises for what happens inside the worker; a ``KeyboardInterrupt`` in the parent kills the
    worker and is re-raised (the unfinished run is not returned, so it is never stored as ok).

    Args:
        plan_: from :func:`workbench.runner.plan` (sent to the worker as JSON).
        limits: timeout and memory cap.
        index: the run's position in its sweep (used only by ``WORKBENCH_FAULT_INJECT``).
        environment: the fingerprint to store with a run whose worker died without reporting one.
    """
    # 1. Start the worker with one end of a pipe; close our copy of that end so a dead worker reads as EOF.
    context = worker_context()
    receiver, sender = context.Pipe(duplex=False)
    started = time.perf_counter()
    process = context.Process(
        target=_worker_main, name=f"workbench-run-{index}", daemon=True,
        args=(json.dumps(plan_.to_dict()), index, limits.max_memory_bytes, time.time(), sender, _parent_state()),
    )
    try:
        process.start()
        sender.close()
        # 2. Wait for start-up, then for the row, the worker's death or the timeout, whichever comes first.
        message, reason = _receive(receiver, STARTUP_TIMEOUT_S), None
        if message is _TIMEOUT:
            message, reason = None, f"worker did not start within {STARTUP_TIMEOUT_S:g} s"
        elif message == _READY:
            message = _receive(receiver, limits.timeout_s)
            if message is _TIMEOUT:
                message, reason = None, f"timed out after {limits.timeout_s:g} s"
        # 3. Make sure the worker is gone, and say how it ended.
        process.join(5 if message is not None else 0.5)
        if process.is_alive():
            process.kill()
            process.join()
        wall_s = time.perf_counter() - started
        if message is not None:
            row = json.loads(message.decode("utf-8"))
            row.setdefault("internals", {}).setdefault("worker", {})["wall_s"] = wall_s
            return row
        return _failed_row(plan_, reason or _death_reason(process.exitcode, limits), environment,
                           {"exitcode": process.exitcode, "wall_s": wall_s})
    except BaseException:  # KeyboardInterrupt included: never leave a worker behind
        if process.is_alive():
            process.kill()
            process.join()
        raise
    finally:
        receiver.close()


_TIMEOUT = object()


def worker_context() -> Any:
    """The multiprocessing context workers start from: a forkserver that preloads the heavy imports
    (set once, before it starts), or spawn where the platform has no forkserver."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    if not forkserver._forkserver._forkserver_pid:  # not started yet: say what it should import
        context.set_forkserver_preload(PRELOAD_MODULES)
    return context


def _parent_state() -> dict[str, Any]:
    """What the worker must see as the parent sees it now (a forkserver keeps its start-time state)."""
    return {"environ": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}


def _receive(receiver: Any, timeout_s: float | None) -> Any:
    """The next message, None when the worker died (EOF), or ``_TIMEOUT``."""
    if not receiver.poll(timeout_s):
        return _TIMEOUT
    try:
        return receiver.recv_bytes()
    except (EOFError, OSError):
        return None


def _death_reason(exitcode: int | None, limits: WorkerLimits) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends it; try --max-memory)" if name == "SIGKILL" else ""
        return f"worker killed by signal {name}{hint}"
    return f"worker exited with code {exitcode} without reporting a result"


def _failed_row(plan_: Plan, reason: str, environment: dict[str, Any] | None,
                worker: dict[str, Any]) -> dict[str, Any]:
    from workbench.store import json_safe

    return json_safe(_failed_result(plan_.spec, plan_.to_dict()["facts"], reason, environment, worker).to_row())


def _failed_result(spec: RunSpec, facts: dict[str, Any], reason: str, environment: dict[str, Any] | None,
                   worker: dict[str, Any]) -> Any:
    from workbench.runner import RunResult

    draft = facts.get("draft") or {}
    return RunResult(spec=spec, status="failed", failure_reason=reason, environment=environment or {},
                     internals={"worker": worker}, model_name=facts["model"]["name"],
                     model_digest=facts["model"]["digest"], draft_name=draft.get("name"))


# ----------------------------------------------------------------------------------------------------
# inside the worker
# ----------------------------------------------------------------------------------------------------


def _worker_main(plan_json: str, index: int, max_memory_bytes: int | None, parent_started_at: float,
                 sender: Any, parent: dict[str, Any] | None = None, report_calls: bool = False) -> None:
    """The worker's entry point: limits, imports, the parent's plan, (fault), execute, send the row as JSON.

    ``report_calls`` (an :class:`IsolatedRun` sets it; :func:`run_isolated` does not) also sends throttled
    ``b"calls:DONE/TOTAL"`` messages while measuring, before the row."""
    # 1. Ctrl-C reaches the whole terminal process group: the parent decides, the worker ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:  # the parent's environment and directory now, not the forkserver's at its start
        os.environ.clear()
        os.environ.update(parent["environ"])
        os.chdir(parent["cwd"])
    _watch_parent(os.getppid(), None if parent is None else parent["pid"])
    if max_memory_bytes is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _thread_lock_for_tqdm()
    plan_data = json.loads(plan_json)
    spec = RunSpec.from_dict(plan_data["spec"])
    row: dict[str, Any]
    try:
        # 2. Imports (the bulk of the start-up cost), then the plan the parent made (not planned again).
        import transformers

        from workbench import runner

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        planned = runner.Plan.from_dict(plan_data)
        startup_s = time.time() - parent_started_at
        sender.send_bytes(_READY)
        # 3. The testing aid, then the run itself (execute turns exceptions into a failed result).
        _inject_fault(index, spec.key())
        result = runner.execute(planned, progress=False, on_calls=_calls_sender(sender) if report_calls else None)
        if result.status == "failed" and _is_memory_error(result.failure_reason, result.internals):
            result.failure_reason = _memory_reason(max_memory_bytes, result.failure_reason)
        result.internals["worker"] = {"pid": os.getpid(), "startup_s": startup_s}
        row = result.to_row()
    except BaseException as exc:  # an import, plan or injected failure still reports a row
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        if isinstance(exc, MemoryError) or _is_memory_error(text, {}):
            text = _memory_reason(max_memory_bytes, text)
        elif not isinstance(exc, WorkbenchError):
            text = f"worker raised {text}"
        row = _failed_result(spec, plan_data["facts"], text[:500], None, {"pid": os.getpid()}).to_row()
    # 4. Send the row as JSON text (never a pickle of stored values).
    from workbench.store import to_json

    sender.send_bytes(to_json(row, "row").encode("utf-8"))
    sender.close()


def _thread_lock_for_tqdm() -> None:
    """tqdm's default lock includes a multiprocessing semaphore, registered with the parent's resource
    tracker; a worker killed on timeout never unregisters it, and the tracker warns of a leak at shutdown.
    A worker draws no bars for other processes, so a thread lock does."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _calls_sender(sender: Any) -> Any:
    """An ``on_calls(done, total)`` that sends ``b"calls:done/total"`` at most every ``CALLS_EVERY_S``
    (plus the first and the last), so a fast run does not flood the pipe."""
    last_sent_s = -float("inf")

    def send(done: int, total: int) -> None:
        nonlocal last_sent_s
        now = time.perf_counter()
        if done in (0, total) or now - last_sent_s >= CALLS_EVERY_S:
            sender.send_bytes(_CALLS + f"{done}/{total}".encode("ascii"))
            last_sent_s = now

    return send


def parse_calls(message: bytes) -> tuple[int, int] | None:
    """(done, total) of a progress message, None for any other message.

    Example:
        >>> parse_calls(b"calls:12/40"), parse_calls(b"ready")
        ((12, 40), None)
    """
    if not message.startswith(_CALLS):
        return None
    done, _, total = message[len(_CALLS):].decode("ascii").partition("/")
    return int(done), int(total)


def _is_memory_error(reason: str | None, internals: dict[str, Any]) -> bool:
    text = f"{reason or ''} {internals.get('error', '')}".lower()
    return "memoryerror" in text or "can't allocate memory" in text or "out of memory" in text


def _memory_reason(max_memory_bytes: int | None, detail: str | None) -> str:
    limit = f" (limit {max_memory_bytes / 2**30:g} GB of address space)" if max_memory_bytes else ""
    return f"out of memory{limit}: {detail}"[:500]


def _watch_parent(parent_pid: int, owner_pid: int | None = None) -> None:
    """Exit when the parent dies (SIGKILL leaves no chance to clean up), so no orphan runs on.

    ``parent_pid`` is the process that started this one (the forkserver, or the owner when spawned);
    ``owner_pid`` the process that asked for the run, watched too (dead or a zombie: exit)."""
    import threading

    def owner_gone() -> bool:
        if owner_pid is None or owner_pid == parent_pid:
            return False
        import psutil

        try:
            return psutil.Process(owner_pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid or owner_gone():
                os._exit(70)

    threading.Thread(target=watch, name="workbench-parent-watch", daemon=True).start()


def parse_faults(text: str | None) -> list[tuple[str, str]]:
    """``WORKBENCH_FAULT_INJECT`` as (kind, target) pairs; a malformed value raises one clear line.

    Example:
        >>> parse_faults("segfault:3,hang:7")
        [('segfault', '3'), ('hang', '7')]
    """
    faults = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        kind, sep, target = part.strip().partition(":")
        if not sep or kind not in FAULT_KINDS or not target:
            raise SpecError(f"{FAULT_ENV} entry {part.strip()!r} is not KIND:TARGET with KIND one of "
                            f"{', '.join(FAULT_KINDS)}: e.g. {FAULT_ENV}=segfault:3")
        faults.append((kind, target))
    return faults


def _inject_fault(index: int, spec_key: str) -> None:
    for kind, target in parse_faults(os.environ.get(FAULT_ENV)):
        if target == str(index) or (len(target) >= 8 and spec_key.startswith(target)):
            _fault(kind)


def _fault(kind: str) -> None:
    if kind == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "exception":
        raise RuntimeError("injected by WORKBENCH_FAULT_INJECT")
    elif kind == "oom":  # under the --max-memory cap, or 512 MB over what is mapped now
        import resource

        if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
            with open("/proc/self/statm") as fh:
                mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**29, resource.RLIM_INFINITY))
        hoard = []
        while True:
            hoard.append(bytearray(2**28))
    elif kind == "exit":
        os._exit(3)


# ----------------------------------------------------------------------------------------------------
# non-blocking: start, poll, kill (for interactive front ends such as the compare panel)
# ----------------------------------------------------------------------------------------------------


class IsolatedRun:
    """One spec running in its own spawned worker, without blocking the caller.

    The same worker and the same rows as :func:`run_isolated`, but the caller polls: :meth:`poll`
    returns None while the run goes on and the finished store row afterwards (a failed row when the
    worker died, timed out or was stopped with :meth:`kill`). ``phase`` says where the run is:
    ``"starting"`` (spawn, imports, plan), ``"running"`` (loading, then measuring), then ``"done"``;
    ``calls_done`` of ``calls_total`` timed calls (warm-up included) have finished (both None until the
    models are loaded and the worker has counted them).

    Example:
        >>> job = IsolatedRun(plan(spec), WorkerLimits(timeout_s=120))  # doctest: +SKIP
        >>> while (row := job.poll()) is None:  # doctest: +SKIP
        ...     time.sleep(0.2)
        >>> row["status"]  # doctest: +SKIP
        'ok'
    """

    def __init__(self, plan_: Plan, limits: WorkerLimits = WorkerLimits(), index: int = 0,
                 environment: dict[str, Any] | None = None) -> None:
        self.plan, self.spec = plan_, plan_.spec
        self.limits, self.index, self.environment = limits, index, environment
        self.phase = "starting"  # "starting", "running" or "done"
        self.started_at_s = time.perf_counter()
        self.running_since_s: float | None = None  # perf_counter() when the worker reported ready
        self.row: dict[str, Any] | None = None
        self.calls_done: int | None = None  # warm-up and timed calls finished, from the worker's messages
        self.calls_total: int | None = None  # all of them, both variants
        context = worker_context()
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_worker_main, name=f"workbench-run-{index}", daemon=True,
            args=(json.dumps(plan_.to_dict()), index, limits.max_memory_bytes, time.time(), sender,
                  _parent_state(), True))
        self._process.start()
        sender.close()

    @property
    def elapsed_s(self) -> float:
        """Seconds since the worker was started."""
        return time.perf_counter() - self.started_at_s

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def poll(self) -> dict[str, Any] | None:
        """The finished row, or None while the worker still runs (never blocks, never raises)."""
        if self.row is not None:
            return self.row
        now = time.perf_counter()
        # 1. Every waiting message: the ready signal, progress, then the row; EOF means the worker died.
        while self._receiver.poll(0):
            try:
                message = self._receiver.recv_bytes()
            except (EOFError, OSError):
                message = None
            if message == _READY:
                self.phase, self.running_since_s = "running", now
                continue
            calls = parse_calls(message) if message is not None else None
            if calls is not None:
                self.calls_done, self.calls_total = calls
                continue
            if message is not None:
                row = json.loads(message.decode("utf-8"))
                row.setdefault("internals", {}).setdefault("worker", {})["wall_s"] = self.elapsed_s
                return self._finish(row, join_s=5)
            self._process.join(2)
            return self._finish(None, reason=_death_reason(self._process.exitcode, self.limits))
        # 2. No message: the limits, then a worker that died without closing the pipe.
        if self.phase == "starting" and now - self.started_at_s > STARTUP_TIMEOUT_S:
            return self._finish(None, reason=f"worker did not start within {STARTUP_TIMEOUT_S:g} s")
        if (self.phase == "running" and self.limits.timeout_s is not None
                and now - (self.running_since_s or now) > self.limits.timeout_s):
            return self._finish(None, reason=f"timed out after {self.limits.timeout_s:g} s")
        if not self._process.is_alive() and not self._receiver.poll(0):
            return self._finish(None, reason=_death_reason(self._process.exitcode, self.limits))
        return None

    def kill(self, reason: str = "stopped by the user") -> dict[str, Any]:
        """Kill the worker now; the run becomes a failed row with ``reason`` (never an ok one)."""
        if self.row is not None:
            return self.row
        return self._finish(None, reason=reason)

    def _finish(self, row: dict[str, Any] | None, reason: str | None = None, join_s: float = 0.5) -> dict[str, Any]:
        self._process.join(join_s if row is not None else 0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._receiver.close()
        if row is None:
            row = _failed_row(self.plan, reason or "worker ended without a result", self.environment,
                              {"exitcode": self._process.exitcode, "wall_s": self.elapsed_s})
        self.phase, self.row = "done", row
        return row
