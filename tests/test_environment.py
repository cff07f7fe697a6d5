"""The fingerprint describes this machine, and the bandwidth probe is plausible and cached on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench import environment

HARDWARE_KEYS = {"cpu_model", "cpu_cores_logical", "ram_bytes", "gpu_name", "gpu_count"}
GPU_KEYS = ("gpu_name", "gpu_count", "gpu_memory_bytes", "gpu_compute_capability", "cuda_version")


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data folder, so the bandwidth cache starts empty."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_fingerprint_fields_and_types_without_bandwidth() -> None:
    env = environment.fingerprint(measure_bandwidth=False)

    assert json.loads(json.dumps(env, allow_nan=False)) == env  # flat and JSON-serialisable
    assert all(not isinstance(v, (dict, list)) for v in env.values())
    assert len(env["machine_id"]) == 16 and int(env["machine_id"], 16) >= 0
    for key in ("hostname", "os", "python", "cpu_model"):
        assert isinstance(env[key], str) and env[key], key
    assert env["cpu_cores_logical"] >= 1
    assert env["cpu_cores_physical"] is None or 1 <= env["cpu_cores_physical"] <= env["cpu_cores_logical"]
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["ram_bytes"] > 2**27
    assert env["torch"] == torch.__version__
    assert env["workbench"] is not None
    for key in ("transformers", "diffusers", "accelerate"):
        assert key in env and (env[key] is None or isinstance(env[key], str))
    assert env["memory_bandwidth_bytes_per_s"] is None
    assert env["gpu_memory_bandwidth_bytes_per_s"] is None
    if torch.cuda.is_available():
        assert env["gpu_count"] >= 1 and env["gpu_memory_bytes"] > 0
        assert env["gpu_compute_capability"].count(".") == 1
    else:
        assert all(env[key] is None for key in GPU_KEYS)


def test_machine_id_is_stable_and_hashes_hardware_only() -> None:
    first = environment.fingerprint(measure_bandwidth=False)["machine_id"]
    threads = torch.get_num_threads()
    # Recompute from scratch (drop the in-process caches) with a different thread setting.
    environment._machine_id.cache_clear()
    environment._hardware_fields.cache_clear()
    environment._static_fields.cache_clear()
    try:
        torch.set_num_threads(1)
        again = environment.fingerprint(measure_bandwidth=False)
    finally:
        torch.set_num_threads(threads)

    assert again["machine_id"] == first == environment.machine_id()
    assert set(environment.hardware_fields()) == HARDWARE_KEYS


def test_cpu_model_reads_x86_and_aarch64_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2000.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n")

    assert environment.cpu_model(x86) == "AMD EPYC 7763 64-Core"
    assert environment.cpu_model(arm) == "ARM Neoverse-V2"
    assert environment.cpu_model(tmp_path / "missing")  # falls back to platform, never empty


def test_bandwidth_is_plausible_and_cached(data_dir: Path) -> None:
    measured = environment.measure_memory_bandwidth("cpu")
    cache = environment.bandwidth_cache_path("cpu")

    assert 1e8 < measured < 1e13  # bytes/s: between a slow laptop and far beyond any CPU
    assert cache == data_dir / "cache" / f"bandwidth-{environment.machine_id()}-cpu.json"
    record = json.loads(cache.read_text())
    assert record["bytes_per_s"] == measured and record["device"] == "cpu"

    # A second call reads the file instead of measuring: it returns whatever the file says.
    record["bytes_per_s"] = 123_456_789.0
    cache.write_text(json.dumps(record))
    assert environment.measure_memory_bandwidth("cpu") == 123_456_789.0
    assert environment.fingerprint()["memory_bandwidth_bytes_per_s"] == 123_456_789.0


@pytest.mark.parametrize("content", ["{not json", '{"bytes_per_s": -1}', '{"bytes_per_s": "fast"}', "[]"])
def test_corrupt_bandwidth_cache_is_measured_again(content: str) -> None:
    cache = environment.bandwidth_cache_path("cpu")
    cache.write_text(content)

    measured = environment.measure_memory_bandwidth("cpu")

    assert measured > 1e8
    assert json.loads(cache.read_text())["bytes_per_s"] == measured  # rewritten, valid JSON


def test_unknown_or_missing_device_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu9'"):
        environment.measure_memory_bandwidth("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available; use device='cpu'"):
            environment.fingerprint(measure_bandwidth=False, device="cuda")
