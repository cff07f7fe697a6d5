"""What else is using the machine: contention measured before and during a run, stored with it.

On a shared machine the clock measures the neighbours too: when other processes take the cores, torch's
intra-op threads wait for each other and a model can run 40x slower with nothing in the figures saying
why. So every run reads, from the kernel's own counters (Linux ``/proc``), how busy the CPUs this
process may use were *apart from this process*, before it starts (a short probe) and over the whole
measurement; the steal time a hypervisor took; the load average; the busiest other processes by name;
and, on CUDA, the GPU utilisation before the run (work of others: this process has not started yet).
A run whose figures crossed a threshold is flagged *noisy machine* wherever it is shown, and the
meta-learner trusts it less.

Everything returns plain data; nothing prints. On a system without ``/proc`` the figures are None
(not measured), never invented, and a run is never flagged on a guess.

Example:
    >>> monitor = NoiseMonitor()
    >>> monitor.start()
    >>> noise = monitor.stop()
    >>> sorted(k for k in noise if k.startswith("others"))[:2]
    ['others_cores_before', 'others_cores_during']
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

#: Other work averaging this many cores (on the CPUs this process may use) makes a run noisy: a fifth of
#: one core is what a busy neighbour costs a two-thread run on two cores, far above a quiet desktop's
#: background (0.01-0.05 cores here).
NOISY_OTHERS_CORES = 0.2
NOISY_STEAL_PERCENT = 5.0  # a hypervisor taking this share of the CPUs' time makes a run noisy
NOISY_GPU_BUSY_PERCENT = 10.0  # others keeping the GPU this busy before the run makes it noisy
PROBE_S = 0.5  # length of the probe before a run
TOP_PROCESSES = 3  # other processes named in the record, busiest first


# ----------------------------------------------------------------------------------------------
# Kernel counters


@dataclass(frozen=True)
class Snapshot:
    """Counters at one instant: per-CPU busy and total ticks of our CPUs, our own CPU time, others'."""

    wall_s: float  # time.monotonic()
    busy_ticks: int  # user+nice+system+irq+softirq+steal ticks of the CPUs in our affinity set
    total_ticks: int  # every tick of those CPUs (busy + idle + iowait)
    steal_ticks: int
    own_cpu_s: float  # this process's CPU time (all threads, user + system)
    processes: dict[int, tuple[str, int]]  # pid -> (command, user + system ticks) of every other process


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cores_available() -> int:
    """CPUs this process may run on (its affinity set, capped by a cgroup CPU quota when one is set)."""
    cores = len(_cpus())
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = max(1, min(cores, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _read_cpu_ticks(cpus: set[int]) -> tuple[int, int, int] | None:
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    busy = total = steal = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(x) for x in rest.split()]
        user, nice, system, idle, iowait, irq, softirq, stolen = (fields + [0] * 8)[:8]
        busy += user + nice + system + irq + softirq + stolen
        total += user + nice + system + idle + iowait + irq + softirq + stolen
        steal += stolen
    return busy, total, steal


def _other_processes(own: int) -> dict[int, tuple[str, int]]:
    """pid -> (command, CPU ticks so far) of every process but this one and its threads."""
    found: dict[int, tuple[str, int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid == own:
            continue
        try:
            raw = open(f"/proc/{pid}/stat").read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        command = raw[raw.index("(") + 1: raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        found[pid] = (command, int(fields[11]) + int(fields[12]))  # utime + stime (fields 14 and 15)
    return found


def snapshot() -> Snapshot | None:
    """The counters now, or None where the kernel does not expose them (not Linux)."""
    ticks = _read_cpu_ticks(_cpus())
    if ticks is None:
        return None
    times = os.times()
    return Snapshot(time.monotonic(), *ticks, own_cpu_s=times.user + times.system,
                    processes=_other_processes(os.getpid()))


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def between(first: Snapshot, last: Snapshot) -> dict[str, Any]:
    """Others' mean busy cores, steal share and the busiest other processes between two snapshots."""
    wall = max(last.wall_s - first.wall_s, 1e-9)
    total = max(last.total_ticks - first.total_ticks, 1)
    cores = len(_cpus())
    busy_cores = cores * (last.busy_ticks - first.busy_ticks) / total
    own_cores = (last.own_cpu_s - first.own_cpu_s) / wall
    hz = _clock_ticks()
    others = []
    for pid, (command, ticks) in last.processes.items():
        before = first.processes.get(pid, (command, 0))[1]  # started meanwhile: all its ticks are new
        used = (ticks - before) / hz / wall
        if used > 0.005:
            others.append({"pid": pid, "command": command, "cores": round(used, 3)})
    others.sort(key=lambda p: -p["cores"])
    return {
        "seconds": wall,
        "others_cores": max(0.0, busy_cores - own_cores),
        "own_cores": own_cores,
        "steal_percent": 100.0 * (last.steal_ticks - first.steal_ticks) / total,
        "top_processes": others[:TOP_PROCESSES],
    }


def probe(seconds: float = PROBE_S) -> dict[str, Any] | None:
    """Contention over the next ``seconds`` (this process idle meanwhile), or None without ``/proc``."""
    first = snapshot()
    if first is None:
        return None
    time.sleep(seconds)
    last = snapshot()
    return between(first, last) if last is not None else None


def gpu_busy_percent() -> float | None:
    """The GPU's utilisation now (``nvidia-smi``), before this process uses it: others' work; None
    where there is no NVIDIA GPU or tool."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        return max(float(v) for v in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Before and during a run


def is_noisy(noise: dict[str, Any] | None) -> bool:
    """Whether a stored noise record crossed a threshold (see :func:`reasons`)."""
    return bool(reasons(noise))


def reasons(noise: dict[str, Any] | None) -> list[str]:
    """Why a run counts as *noisy machine*, one phrase per threshold crossed (none measured: none)."""
    n = noise or {}
    found = []
    for when in ("before", "during"):
        cores = n.get(f"others_cores_{when}")
        if cores is not None and cores >= NOISY_OTHERS_CORES:
            found.append(f"other processes used {cores:.2f} cores {when} the run")
    steal = n.get("steal_percent_during")
    if steal is not None and steal >= NOISY_STEAL_PERCENT:
        found.append(f"the hypervisor stole {steal:.0f}% of the CPU time")
    gpu = n.get("gpu_busy_percent_before")
    if gpu is not None and gpu >= NOISY_GPU_BUSY_PERCENT:
        found.append(f"the GPU was {gpu:.0f}% busy before the run")
    return found


def summary_text(noise: dict[str, Any] | None) -> str:
    """'noisy machine: other processes used 1.85 cores during the run (python3 1.84)' or ''."""
    why = reasons(noise)
    if not why:
        return ""
    top = (noise or {}).get("top_processes_during") or []
    who = ", ".join(f"{p['command']} {p['cores']:.2f}" for p in top)
    return "noisy machine: " + "; ".join(why) + (f" ({who})" if who else "")


def threads_for(free_cores: float, available: int) -> int:
    """Torch threads for a run: the cores not taken by others, rounded down, at least one.

    Example:
        >>> threads_for(2.0, 2), threads_for(1.1, 2), threads_for(0.2, 2)
        (2, 1, 1)
    """
    return max(1, min(available, int(free_cores + 0.1)))


def free_threads(busy: dict[str, Any] | None) -> tuple[int, int, float]:
    """Torch threads from a :func:`probe` result (None: not measurable, nobody busy), with the cores
    available to this process and the cores other processes kept busy: ``(threads, available, others)``."""
    available = cores_available()
    others = busy["others_cores"] if busy else 0.0
    return threads_for(available - others, available), available, others


def wait_for_quiet(max_wait_s: float, step_s: float = 1.0) -> dict[str, Any]:
    """Probe every ``step_s`` until others use less than :data:`NOISY_OTHERS_CORES`, for at most
    ``max_wait_s``; returns how long it waited, whether it became quiet, and the last probe."""
    started = time.monotonic()
    last = probe(min(step_s, max(max_wait_s, 0.1)))
    while last is not None and last["others_cores"] >= NOISY_OTHERS_CORES \
            and time.monotonic() - started < max_wait_s:
        last = probe(step_s)
    return {"waited_s": time.monotonic() - started,
            "quiet": last is None or last["others_cores"] < NOISY_OTHERS_CORES, "last_probe": last}


class NoiseMonitor:
    """Measures contention over a run: :meth:`start` probes first, :meth:`stop` returns the record.

    The record (stored in the run's ``noise`` column) has ``others_cores_before`` / ``_during`` (mean
    cores busy with other work on this process's CPUs), ``steal_percent_during``, ``load_average``
    (1-minute, at the end), ``cores_available``, ``top_processes_during`` and, on CUDA,
    ``gpu_busy_percent_before``; plus ``noisy`` and its ``reasons``.
    """

    def __init__(self, device: str = "cpu", probe_s: float = PROBE_S) -> None:
        self.device, self.probe_s = device, probe_s
        self.before: dict[str, Any] | None = None
        self._start: Snapshot | None = None
        self.gpu_before: float | None = None

    def start(self) -> dict[str, Any] | None:
        """Probe the machine for ``probe_s`` (idle), then start counting; returns the probe."""
        if self.device.startswith("cuda"):
            self.gpu_before = gpu_busy_percent()
        self.before = probe(self.probe_s) if self.probe_s > 0 else None
        self._start = snapshot()
        return self.before

    def stop(self) -> dict[str, Any]:
        last = snapshot()
        during = between(self._start, last) if self._start is not None and last is not None else None
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
        record: dict[str, Any] = {
            "cores_available": cores_available(),
            "others_cores_before": None if self.before is None else round(self.before["others_cores"], 3),
            "top_processes_before": [] if self.before is None else self.before["top_processes"],
            "others_cores_during": None if during is None else round(during["others_cores"], 3),
            "own_cores_during": None if during is None else round(during["own_cores"], 3),
            "steal_percent_during": None if during is None else round(during["steal_percent"], 2),
            "top_processes_during": [] if during is None else during["top_processes"],
            "seconds_during": None if during is None else round(during["seconds"], 3),
            "load_average": load,
            "gpu_busy_percent_before": self.gpu_before,
            "thresholds": {"others_cores": NOISY_OTHERS_CORES, "steal_percent": NOISY_STEAL_PERCENT,
                           "gpu_busy_percent": NOISY_GPU_BUSY_PERCENT},
        }
        record["reasons"] = reasons(record)
        record["noisy"] = bool(record["reasons"])
        return record
