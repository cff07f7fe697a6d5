"""Settings as data: what to run, validated on creation.

Every spec is a frozen dataclass whose fields carry defaults and a one-line comment on their
trade-off. A bad value raises :class:`SpecError` with one line that names the value and what would be
valid, before any model loads.

Example:
    >>> spec = RunSpec(
    ...     model=ModelSpec("zoo:code-target"),
    ...     workload=WorkloadSpec("code-prompts", max_items=4),
    ...     technique=TechniqueSpec("speculative", draft=ModelSpec("zoo:code-draft")),
    ...     repeats=3,
    ... )
    >>> len(spec.key())
    64
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.errors import WorkbenchError

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
#: What a hardware label may be (it becomes a Ray resource name, ``wb-hw:LABEL``).
HARDWARE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SpecError(WorkbenchError, ValueError):
    """A spec value is invalid; the message is one line naming the value and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load.

    Example:
        >>> ModelSpec("zoo:code-target").source
        'zoo'
    """

    name: str  # a Hugging Face id ("gpt2"), a local save_pretrained folder, or "zoo:NAME"
    revision: str | None = None  # hub revision (branch, tag or commit); None takes the default branch
    trust_remote_code: bool = False  # runs code shipped with the model: only for sources you trust
    allow_pickle: bool = False  # allow pickle-based weights (*.bin): unsafe for untrusted files

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and self.name.strip() == self.name and bool(self.name),
            f"model name {self.name!r} is empty or padded: give a hub id, a folder or zoo:NAME",
        )
        if self.name.startswith("zoo:"):
            _check(len(self.name) > 4, "model 'zoo:' names no zoo model: use e.g. zoo:code-target")

    @property
    def source(self) -> str:
        """'zoo', 'path' (a local folder that exists) or 'hub'."""
        from pathlib import Path

        if self.name.startswith("zoo:"):
            return "zoo"
        return "path" if Path(self.name).expanduser().exists() else "hub"


@dataclass(frozen=True)
class WorkloadSpec:
    """Which inputs to run, and how.

    Example:
        >>> WorkloadSpec("code-prompts", max_items=8, max_new_tokens=32).batch_size
        1
    """

    name: str  # a built-in workload name or the path of a JSONL file of inputs
    max_items: int | None = 8  # inputs taken from the workload; more inputs, tighter intervals, longer runs
    max_new_tokens: int = 32  # generation length for text; longer amortises prefill
    batch_size: int = 1  # inputs per call; speculative decoding needs 1
    num_inference_steps: int = 50  # diffusion steps for diffusion workloads
    seed: int = 0  # selects and orders the inputs; same seed, same inputs

    def __post_init__(self) -> None:
        _check(bool(self.name), "workload name is empty: give a built-in name or a .jsonl path")
        _check(
            self.max_items is None or (isinstance(self.max_items, int) and self.max_items >= 1),
            f"max_items={self.max_items!r} is invalid: use a positive integer or None for all",
        )
        for name in ("max_new_tokens", "batch_size", "num_inference_steps"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name}={value!r} is invalid: use a positive integer",
            )


@dataclass(frozen=True)
class TechniqueSpec:
    """Which technique to compare against the baseline, with its parameters.

    ``params`` is stored as a sorted tuple of (key, value) pairs so the spec stays hashable; build it
    from a dict with :meth:`from_dict` or pass a dict, which is converted.

    Example:
        >>> TechniqueSpec("speculative", {"num_assistant_tokens": 4}).param_dict
        {'num_assistant_tokens': 4}
    """

    name: str  # a registered technique name (see `workbench.techniques.names()`)
    params: Any = ()  # technique parameters as a dict or (key, value) pairs; values are str/int/float/bool/None
    draft: ModelSpec | None = None  # a draft (assistant) model, for techniques that need one

    def __post_init__(self) -> None:
        _check(bool(self.name), "technique name is empty: see `workbench techniques` for names")
        pairs = self.params.items() if isinstance(self.params, dict) else self.params
        try:
            pairs = tuple(sorted((str(k), v) for k, v in pairs))
        except (TypeError, ValueError) as exc:
            raise SpecError(f"technique params {self.params!r} are not key/value pairs: {exc}") from None
        for key, value in pairs:
            _check(
                value is None or isinstance(value, (str, int, float, bool)),
                f"param {key}={value!r} has type {type(value).__name__}: use str, int, float or bool",
            )
        object.__setattr__(self, "params", pairs)
        if isinstance(self.draft, str):
            object.__setattr__(self, "draft", ModelSpec(self.draft))

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class RunSpec:
    """One comparison: a technique against the baseline on one model, workload and device.

    ``key()`` is a stable hash of every field that changes the measurement, so an identical run can
    be recognised across processes and machines (used to resume sweeps).
    """

    model: ModelSpec  # the model both variants run
    workload: WorkloadSpec  # the inputs both variants see, in the same order
    technique: TechniqueSpec  # the variant compared against the baseline
    device: str = "cpu"  # "cpu" or "cuda" ("cuda:1" for a given GPU)
    dtype: str = "float32"  # weights' dtype for both variants; techniques may change their own
    seed: int = 0  # torch seed set before every call, so sampling variants see the same randomness
    repeats: int = 5  # timed passes over the workload; more repeats, tighter intervals
    warmup: int = 1  # untimed passes first (caches, lazy init, allocator); never counted
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    margin_percent: float = 2.0  # equivalence band of the verdict: |speedup - 1| within it is "no practical
    # difference"; how a result is judged, not what is measured (not in the key)
    labels: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # free-form tags, not in the key
    hardware: str | None = None  # the kind of machine to run on, for a cluster (``workbench sweep --ray``): a
    # label its nodes advertise, e.g. "cpu-epyc" or "gpu-h100"; None: any node of the run's device kind

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelSpec), ("workload", WorkloadSpec), ("technique", TechniqueSpec)):
            _check(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}")
        base = self.device.split(":", 1)[0]
        _check(base in DEVICES, f"device={self.device!r} is unknown: use one of {', '.join(DEVICES)}")
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r} is unknown: use one of {', '.join(DTYPES)}")
        _check(
            isinstance(self.repeats, int) and not isinstance(self.repeats, bool) and self.repeats >= 1,
            f"repeats={self.repeats!r} is invalid: use a positive integer (3 or more for an interval)",
        )
        _check(
            isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0,
            f"warmup={self.warmup!r} is invalid: use 0 or a positive integer",
        )
        _check(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            f"threads={self.threads!r} is invalid: use a positive integer or None for torch's default",
        )
        _check(
            self.hardware is None or (isinstance(self.hardware, str) and HARDWARE_LABEL.fullmatch(self.hardware)),
            f"hardware={self.hardware!r} is invalid: use a short label of letters, digits, '-', '_' or '.', "
            "e.g. cpu-epyc or gpu-h100",
        )
        _check(
            isinstance(self.margin_percent, (int, float)) and not isinstance(self.margin_percent, bool)
            and 0.0 <= float(self.margin_percent) < 100.0,
            f"margin_percent={self.margin_percent!r} is invalid: use a number of percent from 0 to 100, e.g. 2",
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (params as a dict)."""
        data = asdict(self)
        data["technique"]["params"] = self.technique.param_dict
        data["labels"] = dict(self.labels)
        return data

    def key(self) -> str:
        """A sha256 hex digest of the fields that change the measurement (labels excluded; a hardware label
        included when set, so one configuration measured on two kinds of machine is two runs)."""
        data = self.to_dict()
        data.pop("labels")
        data.pop("margin_percent")  # judges the result, does not change the measurement
        if data["hardware"] is None:  # runs keyed before hardware labels existed keep their keys
            data.pop("hardware")
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """Rebuild a spec from :meth:`to_dict` output (for example a stored row's ``spec``)."""
        tech = dict(data["technique"])
        draft = tech.get("draft")
        return cls(
            model=ModelSpec(**data["model"]),
            workload=WorkloadSpec(**data["workload"]),
            technique=TechniqueSpec(
                tech["name"], tech.get("params", {}), ModelSpec(**draft) if draft else None
            ),
            device=data.get("device", "cpu"),
            dtype=data.get("dtype", "float32"),
            seed=data.get("seed", 0),
            repeats=data.get("repeats", 5),
            warmup=data.get("warmup", 1),
            threads=data.get("threads"),
            margin_percent=data.get("margin_percent", 2.0),
            labels=tuple(sorted(data.get("labels", {}).items())),
            hardware=data.get("hardware"),
        )


def parse_param(text: str) -> tuple[str, Any]:
    """Parse a ``key=value`` command-line parameter; numbers and booleans are converted.

    Example:
        >>> parse_param("num_assistant_tokens=4")
        ('num_assistant_tokens', 4)
    """
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"--param {text!r} is not key=value: write e.g. --param threshold=0.9")
    raw = raw.strip()
    lowered = raw.lower()
    value: Any
    if lowered in ("true", "false"):
        value = lowered == "true"
    elif lowered in ("none", "null"):
        value = None
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key.strip(), value
