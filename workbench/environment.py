"""Hardware and software fingerprint of the machine a run executes on, plus a memory-bandwidth probe.

Every stored run carries ``fingerprint()`` so results from different machines are never mixed up, and
the roofline check (tokens/s x bytes read per token / bandwidth) needs the measured memory bandwidth.

Example::

    >>> from workbench.environment import fingerprint
    >>> env = fingerprint(measure_bandwidth=False)
    >>> sorted(env)[:3]
    ['accelerate', 'cpu_cores_logical', 'cpu_cores_physical']
    >>> len(env["machine_id"])
    16
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from workbench import paths

#: Library versions recorded in every fingerprint (None when the package is not installed).
LIBRARIES: tuple[str, ...] = ("torch", "transformers", "diffusers", "accelerate", "workbench")

#: Bytes of the source tensor copied by the probe: large enough to overflow CPU caches / GPU L2.
CPU_PROBE_BYTES = 128 * 2**20
GPU_PROBE_BYTES = 1024 * 2**20
#: Timed copies per probe; the best (fastest) one is kept, since slower ones only add noise.
PROBE_REPEATS = 5
#: Stop repeating once the CPU probe has spent this long (seconds), keeping it well under a second.
CPU_PROBE_BUDGET_S = 0.3

# ARM "CPU implementer" codes from /proc/cpuinfo, for aarch64 machines that print no model name.
_ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu", "0x48": "HiSilicon",
    "0x4e": "NVIDIA", "0x50": "APM", "0x51": "Qualcomm", "0x61": "Apple", "0x63": "Arm China",
    "0x6d": "Microsoft", "0xc0": "Ampere",
}
_ARM_PARTS = {
    "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
    "0xd8e": "Neoverse-N3", "0xd84": "Neoverse-V3", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
    "0xd03": "Cortex-A53", "0xd07": "Cortex-A57", "0xac3": "Ampere-1", "0xac4": "Ampere-1a",
}


# ----------------------------------------------------------------------------------------------------
# fingerprint
# ----------------------------------------------------------------------------------------------------


def fingerprint(measure_bandwidth: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Describe this machine and its software as one flat, JSON-serialisable dict.

    Args:
        measure_bandwidth: also report the measured memory bandwidth (bytes/s); the first call per
            machine and device takes a few hundred milliseconds, later calls read the cache file.
        device: the device the run uses (``"cpu"``, ``"cuda"``, ``"cuda:1"``). GPU fields describe
            this CUDA device, or CUDA device 0 when ``device`` is not a CUDA device.

    Returns:
        ``machine_id`` (16 hex chars hashed from the hardware fields only), ``hostname``, ``os``,
        ``python``, ``cpu_model``, ``cpu_cores_physical``, ``cpu_cores_logical``, ``torch_threads``,
        ``ram_bytes``, ``gpu_name``, ``gpu_count``, ``gpu_memory_bytes``, ``gpu_compute_capability``
        (e.g. ``"9.0"``), ``cuda_version`` (GPU fields are None without CUDA), one version string per
        library in ``LIBRARIES`` (None when missing), ``memory_bandwidth_bytes_per_s`` (CPU) and
        ``gpu_memory_bandwidth_bytes_per_s`` (None without CUDA or when not measuring).
    """
    import torch

    # 1. Hardware and software that cannot change while the process runs (cached).
    gpu_index = _cuda_index(device)
    env: dict[str, Any] = {"machine_id": _machine_id(gpu_index), **_static_fields(gpu_index)}

    # 2. Settings that can change at run time.
    env["torch_threads"] = torch.get_num_threads()

    # 3. Memory bandwidth (cached per machine and device on disk).
    env["memory_bandwidth_bytes_per_s"] = None
    env["gpu_memory_bandwidth_bytes_per_s"] = None
    if measure_bandwidth:
        env["memory_bandwidth_bytes_per_s"] = measure_memory_bandwidth("cpu")
        if gpu_index is not None:
            env["gpu_memory_bandwidth_bytes_per_s"] = measure_memory_bandwidth(f"cuda:{gpu_index}")
    return env


def hardware_fields(device: str = "cpu") -> dict[str, Any]:
    """The fields that identify the hardware and are hashed into ``machine_id``.

    ``cpu_model``, ``cpu_cores_logical``, ``ram_bytes``, ``gpu_name`` and ``gpu_count``; hostname,
    OS and library versions are left out so an upgrade or a rename keeps the same machine id.
    """
    return dict(_hardware_fields(_cuda_index(device)))


def machine_id(device: str = "cpu") -> str:
    """16 hex characters: sha256 of ``hardware_fields(device)``, stable across calls and processes."""
    return _machine_id(_cuda_index(device))


@functools.lru_cache(maxsize=None)
def _machine_id(gpu_index: int | None) -> str:
    blob = json.dumps(_hardware_fields(gpu_index), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _hardware_fields(gpu_index: int | None) -> tuple[tuple[str, Any], ...]:
    gpu = _gpu_fields(gpu_index)
    fields = {
        "cpu_model": cpu_model(),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": int(psutil.virtual_memory().total),
        "gpu_name": gpu["gpu_name"],
        "gpu_count": gpu["gpu_count"],
    }
    return tuple(sorted(fields.items()))


@functools.lru_cache(maxsize=None)
def _static_fields(gpu_index: int | None) -> dict[str, Any]:
    hardware = dict(_hardware_fields(gpu_index))
    fields: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": hardware["cpu_model"],
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": hardware["cpu_cores_logical"],
        "ram_bytes": hardware["ram_bytes"],
        **_gpu_fields(gpu_index),
    }
    fields.update({name: package_version(name) for name in LIBRARIES})
    return fields


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (e.g. ``"2.5.1"``), or None when missing."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's marketing name, e.g. ``"AMD EPYC 7763 64-Core Processor"`` or ``"ARM Neoverse-V2"``.

    Reads ``model name`` from /proc/cpuinfo (x86), then ``Model`` / ``Hardware`` or the implementer
    and part codes (aarch64), then ``platform.processor()``, then ``platform.machine()``.
    """
    info = _read_cpuinfo(Path(cpuinfo_path))
    for key in ("model name", "Model", "Hardware", "cpu model", "cpu"):
        if info.get(key):
            return info[key]
    implementer = info.get("CPU implementer", "").lower()
    if implementer:
        part = info.get("CPU part", "").lower()
        vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer}")
        return f"{vendor} {_ARM_PARTS.get(part, f'part {part}')}".strip()
    return platform.processor() or platform.machine() or "unknown"


def _read_cpuinfo(path: Path) -> dict[str, str]:
    """First value of each key in a /proc/cpuinfo-style file ({} when unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def _cuda_index(device: str) -> int | None:
    """The CUDA device index the GPU fields describe, or None when CUDA is not available."""
    import torch

    parsed = _parse_device(device)
    if parsed.type == "cuda":
        _check_cuda(parsed)
        return parsed.index if parsed.index is not None else torch.cuda.current_device()
    return 0 if torch.cuda.is_available() else None


def _gpu_fields(gpu_index: int | None) -> dict[str, Any]:
    """GPU name, count, memory (bytes), compute capability and CUDA version; all None without CUDA."""
    import torch

    if gpu_index is None:
        return dict.fromkeys(
            ("gpu_name", "gpu_count", "gpu_memory_bytes", "gpu_compute_capability", "cuda_version")
        )
    props = torch.cuda.get_device_properties(gpu_index)
    return {
        "gpu_name": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_bytes": int(props.total_memory),
        "gpu_compute_capability": f"{props.major}.{props.minor}",
        "cuda_version": torch.version.cuda,
    }


def _parse_device(device: str) -> Any:
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps' ({err})"
        ) from None


def _check_cuda(parsed: Any) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device '{parsed}' asked for but CUDA is not available; use device='cpu'")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"device '{parsed}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )


# ----------------------------------------------------------------------------------------------------
# memory bandwidth
# ----------------------------------------------------------------------------------------------------


def measure_memory_bandwidth(device: str = "cpu") -> float:
    """Memory bandwidth of ``device`` in bytes/s, from timing a large tensor copy (best of a few).

    Each copy reads and writes the tensor, so ``2 * tensor_bytes / seconds`` is reported. The first
    call per machine and device measures (at most a few hundred ms on CPU) and writes
    ``cache_dir() / f"bandwidth-{machine_id}-{device}.json"``; later calls read that JSON file. A cache
    file that cannot be read or holds an implausible value is measured again and rewritten.
    """
    # 1. Normalise the device so "cuda" and "cuda:0" share one cache file.
    name, gpu_index = _resolve_device(device)

    # 2. Read the cache.
    path = bandwidth_cache_path(name)
    cached = _read_bandwidth_cache(path)
    if cached is not None:
        return cached

    # 3. Measure and write the cache atomically (write a temporary file, then rename it).
    bytes_per_s, tensor_bytes = _probe_bandwidth(name)
    record = {
        "bytes_per_s": bytes_per_s,
        "device": name,
        "machine_id": _machine_id(gpu_index),
        "measured_at_unix_s": time.time(),
        "tensor_bytes": tensor_bytes,
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1))
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache folder costs a re-measurement next time, nothing more
        warnings.warn(f"could not cache memory bandwidth in {path}: {err}", stacklevel=2)
    return bytes_per_s


def bandwidth_cache_path(device: str = "cpu") -> Path:
    """Where ``measure_memory_bandwidth(device)`` caches its result for this machine."""
    name, gpu_index = _resolve_device(device)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # "cuda:0" -> "cuda_0": a valid file name everywhere
    return paths.cache_dir() / f"bandwidth-{_machine_id(gpu_index)}-{safe}.json"


def _resolve_device(device: str) -> tuple[str, int | None]:
    """(canonical device name, GPU index hashed into the machine id), e.g. ("cuda:0", 0)."""
    parsed = _parse_device(device)
    gpu_index = _cuda_index(device)
    if parsed.type == "cuda":
        return f"cuda:{gpu_index}", gpu_index
    return str(parsed), gpu_index


def _read_bandwidth_cache(path: Path) -> float | None:
    """The cached bytes/s, or None when the file is missing, corrupt or implausible."""
    try:
        value = json.loads(path.read_text())["bytes_per_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _probe_bandwidth(device: str) -> tuple[float, int]:
    """Time ``dst.copy_(src)`` a few times; return (best bytes/s, source tensor bytes)."""
    import torch

    # 1. Size the tensors: leave plenty of memory free on the device.
    dev = torch.device(device)
    if dev.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(dev)
        tensor_bytes = min(GPU_PROBE_BYTES, free_bytes // 4)
    else:
        tensor_bytes = min(CPU_PROBE_BYTES, psutil.virtual_memory().available // 8)
    numel = max(tensor_bytes // 4, 1024)

    # 2. Allocate and touch both tensors, so page faults are not timed.
    src = torch.ones(numel, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _synchronize(dev)

    # 3. Timed copies: best of PROBE_REPEATS (CPU stops early after CPU_PROBE_BUDGET_S).
    best_s = math.inf
    started = time.perf_counter()
    for _ in range(PROBE_REPEATS):
        _synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _synchronize(dev)
        best_s = min(best_s, time.perf_counter() - t0)
        if dev.type == "cpu" and time.perf_counter() - started > CPU_PROBE_BUDGET_S:
            break
    nbytes = src.numel() * src.element_size()
    del src, dst
    return 2 * nbytes / max(best_s, 1e-9), nbytes  # read + write


def _synchronize(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
